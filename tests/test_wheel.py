"""The package as a user gets it: the wheel, installed into a fresh virtual environment (no editable install, no
repository on the path), runs `herd` with its built-in recipes from any directory.

Offline: the wheel is built without build isolation from a copy of the sources, and the runtime dependencies
(torch, numpy, ...) come from the environment running the tests through a .pth file in the new environment.
"""

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def sh(*cmd, timeout=600, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kwargs)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def outer_site_dirs() -> list[str]:
    """The site-packages directories of the environment running the tests (where torch and friends are)."""
    paths = sysconfig.get_paths()
    dirs = [*site.getsitepackages(), paths["purelib"], paths["platlib"]]
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of what a build needs, so that nothing is written into the checkout."""
    tmp = tmp_path_factory.mktemp("build")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "llamaherd", src / "llamaherd", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    sh(sys.executable, "-m", "pip", "wheel", src, "--no-deps", "--no-build-isolation", "--no-index",
       "--no-cache-dir", "-w", tmp / "dist", env=pip_env())
    (whl,) = (tmp / "dist").glob("llamaherd-*.whl")
    return whl


def pip_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    return {**env, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh virtual environment with the wheel installed; its .pth file names the outer site-packages."""
    root = tmp_path_factory.mktemp("venv") / "venv"
    sh(sys.executable, "-m", "venv", "--without-pip", root)
    python = root / "bin" / "python"
    sh(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "--no-cache-dir", wheel,
       env=pip_env())
    purelib = Path(sh(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                      env=pip_env()).stdout.strip())
    # directories named in a .pth file are appended to sys.path; their own .pth files (the editable hook) are not run
    (purelib / "outer-environment.pth").write_text("".join(d + "\n" for d in outer_site_dirs()))
    return root


def test_wheel_ships_the_builtin_recipes(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for recipe in (REPO / "llamaherd" / "recipes").glob("*.toml"):
        assert f"llamaherd/recipes/{recipe.name}" in names
    assert "llamaherd/recipes/tiny.toml" in names


@pytest.mark.slow
def test_installed_wheel_runs_herd_from_anywhere(venv, tmp_path):
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {**pip_env(), "PYTHONNOUSERSITE": "1"}

    def herd(*args, timeout=300):
        return sh(venv / "bin" / "herd", *args, cwd=cwd, env=env, timeout=timeout)

    # inside the new environment, llamaherd is the installed wheel, not the repository
    where = "import llamaherd, sysconfig; print(llamaherd.__file__); print(sysconfig.get_paths()['purelib'])"
    lines = sh(venv / "bin" / "python", "-c", where, cwd=cwd, env=env).stdout.splitlines()
    module, purelib = (Path(line).resolve() for line in lines)
    assert module == purelib / "llamaherd" / "__init__.py"
    assert not module.is_relative_to(REPO.resolve())

    out = herd("--help").stdout
    assert " run " in out and " recipes " in out
    listed = herd("recipes").stdout.splitlines()
    assert any(line.split()[0] == "tiny" for line in listed), listed
    assert herd("recipes", "tiny").stdout == (REPO / "llamaherd" / "recipes" / "tiny.toml").read_text()

    run = tmp_path / "run"
    # pretraining only (post-training's stages have their own tests; here what matters is the installed package)
    herd("run", "tiny", "train.steps=2", "posttraining.stages=[]", "--out", run, "--no-progress", timeout=1800)
    assert (run / "report.md").is_file()
    steps = [json.loads(line).get("step") for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert 2 in steps
    checkpoints = sorted((run / "checkpoints").glob("step_*/model.safetensors"))
    assert [int(c.parent.name.removeprefix("step_")) for c in checkpoints] == [2], checkpoints
    assert sorted(cwd.iterdir()) == []  # it wrote only where --out says
