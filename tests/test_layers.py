"""The package's layers (docs/architecture.md), checked by parsing every import of every module:
no module imports from a higher layer, no modules import each other in a circle, argparse only in CLI
modules. Imports inside functions count too: a lazy import is still a dependency."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "llamaherd"

# lowest first; a module may import from its own layer or below
LAYERS = [
    {"errors"},
    {"model", "tokenizer"},
    {"checkpoint", "data", "config"},
    {"distributed"},
    {"generation"},
    {"train"},
    {"posttrain", "eval", "safety", "scaling"},
    {"serve"},
    {"recipes"},
    {"cli"},  # llamaherd.cli, every `*.cli` module, `__main__` and the package's own __init__ (its public API)
]


def modules(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under ``root`` (the package directory)."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path], package: str) -> set[str]:
    """The package's modules that module ``name`` imports, anywhere in its body."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's own package, up level - 1 packages
                here = name.split(".") if is_package else name.split(".")[:-1]
                base = ".".join(here[: len(here) - node.level + 1] + ([base] if base else []))
            # `from pkg import mod` imports the module pkg.mod; `from mod import name` the module mod
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            if target == package or target.startswith(package + "."):
                while target not in known:  # `import pkg.mod.name`-style: the longest known prefix
                    target = target.rpartition(".")[0]
                found.add(target)
    found.discard(name)
    return found


def layer(name: str, package: str) -> int:
    parts = name.split(".")
    if name == package or parts[-1] in ("cli", "__main__"):
        return len(LAYERS) - 1
    area = parts[1]
    for i, areas in enumerate(LAYERS):
        if area in areas:
            return i
    raise AssertionError(f"{name}: area {area!r} is in no layer; add it to LAYERS (and to docs/architecture.md)")


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def problems(root: Path, package: str) -> list[str]:
    """Every layering problem of the package in ``root``, one line each."""
    known = modules(root, package)
    graph = {name: imports(name, path, known, package) for name, path in known.items()}
    found = []
    for name, targets in sorted(graph.items()):
        mine = layer(name, package)  # every module must sit in a layer, imported or not
        for target in sorted(targets):
            if layer(target, package) > mine:
                found.append(f"upward import: {name} (layer {mine}) imports {target} (layer {layer(target, package)})")
        tree = ast.parse(known[name].read_text(encoding="utf-8"))
        uses_argparse = any(isinstance(n, (ast.Import, ast.ImportFrom)) and "argparse" in
                            ([a.name for a in n.names] if isinstance(n, ast.Import) else [n.module or ""])
                            for n in ast.walk(tree))
        if uses_argparse and mine != len(LAYERS) - 1:
            found.append(f"argparse outside the CLI: {name}")
    found += [f"import cycle: {' <-> '.join(c)}" for c in cycles(graph)]
    return found


def test_no_upward_import_no_cycle_and_argparse_only_in_cli_modules():
    assert problems(PACKAGE, "llamaherd") == []


def test_the_checker_finds_upward_imports_cycles_and_stray_argparse(tmp_path):
    """The check above has teeth: a small package with one problem of each kind."""
    pkg = tmp_path / "pkg"
    files = {
        "__init__.py": "",
        "errors.py": "",
        "model/__init__.py": "from pkg.model import net\n",
        "model/net.py": "def f():\n    from pkg.train import loop  # lazy, still upward\n",
        "data/__init__.py": "",
        "data/a.py": "from pkg.data.b import x\n",
        "data/b.py": "from . import a\nx = 1\n",
        "tokenizer/__init__.py": "import argparse\n",
        "train/__init__.py": "",
        "train/loop.py": "from pkg.errors import *\n",
        "train/cli.py": "import argparse\nfrom pkg import train\n",
    }
    for rel, text in files.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    assert problems(pkg, "pkg") == [
        "upward import: pkg.model.net (layer 1) imports pkg.train.loop (layer 5)",
        "argparse outside the CLI: pkg.tokenizer",
        "import cycle: pkg.data.a <-> pkg.data.b",
    ]
    (pkg / "mystery").mkdir()
    (pkg / "mystery" / "__init__.py").write_text("")
    with pytest.raises(AssertionError, match="area 'mystery' is in no layer"):
        problems(pkg, "pkg")


def test_the_model_makes_no_compilation_or_parallelism_choices():
    """model/ reads like Meta's reference: whether it is being compiled, exported or sharded is decided
    outside it (generation picks the decode attention, train/parallel.py applies compile and sharding)."""
    for path in (PACKAGE / "model").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        for word in ("is_compiling", "torch.distributed", "fully_shard", "torch.export", "is_exporting"):
            assert word not in text, f"{path.relative_to(PACKAGE.parent)} mentions {word}"
