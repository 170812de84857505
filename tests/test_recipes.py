"""The built-in recipes live in the package: `herd recipes` lists them, prints one, names the known ones on error."""

import tomllib
from pathlib import Path

import llamaherd
from llamaherd.cli import main
from llamaherd.config import RECIPES_DIR, builtin_recipes, load_config, resolve_recipe

PACKAGE_RECIPES = Path(llamaherd.__file__).resolve().parent / "recipes"


def first_comment(path: Path) -> str:
    return next(line for line in path.read_text().splitlines() if line.startswith("# "))[2:]


def test_builtin_recipes_are_package_data():
    assert RECIPES_DIR == PACKAGE_RECIPES
    names = {p.stem for p in PACKAGE_RECIPES.glob("*.toml")}
    assert {"tiny", "llama3.2-1b", "llama3-8b"} <= names
    assert builtin_recipes() == [(name, first_comment(PACKAGE_RECIPES / f"{name}.toml")) for name in sorted(names)]
    assert resolve_recipe(None) == resolve_recipe("tiny") == PACKAGE_RECIPES / "tiny.toml"


def test_recipes_lists_names_and_descriptions_in_two_columns(capsys):
    assert main(["recipes"]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert err == "" and len(lines) == len(builtin_recipes())
    column = max(len(name) for name, _ in builtin_recipes()) + 2
    for line, (name, description) in zip(lines, builtin_recipes()):
        assert line[:column].rstrip() == name and line[column:] == description
    tiny = next(line for line in lines if line.startswith("tiny "))
    assert tiny.endswith("  The embedded default: a small Llama 3 built from the Python standard library "
                         "on a laptop CPU.")


def test_recipes_name_prints_the_toml_unchanged(capsys, tmp_path, monkeypatch):
    assert main(["recipes", "tiny"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and out == (PACKAGE_RECIPES / "tiny.toml").read_text()
    assert tomllib.loads(out)["name"] == "tiny"
    # `herd recipes tiny > my.toml` is a starting point: the copy loads to the same config, and overrides apply
    monkeypatch.chdir(tmp_path)
    Path("my.toml").write_text(out)
    assert load_config("my.toml") == load_config("tiny")
    assert load_config("my.toml", ["train.steps=7"]).train.steps == 7


def test_unknown_recipe_is_a_one_line_error_naming_the_known_ones(capsys):
    known = ", ".join(name for name, _ in builtin_recipes())
    names = known.split(", ")
    assert names == sorted(names)
    assert {"llama3-8b", "llama3.2-1b", "tiny", "sft", "rm", "sample", "dpo", "ppo"} <= set(names)
    for name in ("nope", "../config", "tiny.toml"):
        assert main(["recipes", name]) == 2
        out, err = capsys.readouterr()
        assert out == "" and err == f"error: no built-in recipe {name!r} (built-in recipes: {known})\n"
    assert main(["run", "nope"]) == 2
    assert capsys.readouterr().err == f"error: recipe 'nope' not found (built-in recipes: {known})\n"
