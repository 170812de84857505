"""The embedded default corpus: the Python standard library, present wherever Python is.

Three kinds of document:

- ``code``: a module's source, exactly as the file holds it (decoded by its coding cookie);
- ``prose``: its documentation in English, the module docstring followed by every class and
  function docstring (cleaned as ``inspect.cleandoc`` does), each under its qualified name.
  ``pydoc_data.topics`` (the language reference pages that ``help()`` shows) is prose only;
- ``tests``: the source of the test suites (``test/``, ``*/tests``, ``idle_test``), off by default.

``site-packages``, the machine-specific ``_sysconfigdata*`` and the generated codec tables in
``encodings`` are left out, as are files that fail to decode or parse. Modules are
ordered by the SHA-1 of their dotted name, which makes a ``max_bytes`` prefix a spread-out sample
rather than the modules starting with ``_`` and ``a``; the same hash holds out about 5% of modules
as the validation split, so train and val never share a module. Same Python version, same bytes.
"""

from __future__ import annotations

import ast
import hashlib
import io
import os
import sysconfig
import tokenize
import warnings
from collections.abc import Iterator
from pathlib import Path

from llamaherd.data.document import Document
from llamaherd.errors import HerdError

VAL_FRACTION = 0.05
KINDS = ("code", "prose", "tests")
TEST_DIRS = {"test", "tests", "idle_test"}
PROSE_ONLY = "pydoc_data.topics"


def _hash(name: str) -> bytes:
    return hashlib.sha1(name.encode()).digest()


def split_of(module: str) -> str:
    """``"val"`` for about VAL_FRACTION of module names (a stable hash), else ``"train"``."""
    return "val" if int.from_bytes(_hash(module)[:8], "big") < VAL_FRACTION * 2**64 else "train"


def stdlib_modules(root: str | None = None) -> list[tuple[str, Path]]:
    """(dotted name, path) of every module under the stdlib, test suites included, in hash order."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        # only importable package directories: skips lib-dynload, config-3.x-*, site-packages
        dirnames[:] = sorted(d for d in dirnames if d.isidentifier() and d not in ("site-packages", "__pycache__"))
        for f in sorted(filenames):
            if not f.endswith(".py") or f.startswith("_sysconfigdata"):
                continue
            parts = [*rel.parts, f[:-3]]
            if parts[-1] == "__init__":
                parts.pop()
            if parts:
                found.append((".".join(parts), Path(dirpath, f)))
    return sorted(found, key=lambda m: (_hash(m[0]), m[0]))


def _read(path: Path) -> tuple[str, ast.Module] | None:
    raw = path.read_bytes()
    try:
        text = raw.decode(tokenize.detect_encoding(io.BytesIO(raw).readline)[0])
        with warnings.catch_warnings():  # invalid escapes etc. must not print
            warnings.simplefilter("ignore")
            tree = ast.parse(text)
    except (SyntaxError, ValueError, UnicodeDecodeError, LookupError):
        return None
    return text, tree


def _prose(module: str, tree: ast.Module) -> str:
    if module == PROSE_ONLY:  # `topics = {name: page, ...}`: the pages are the prose
        for node in tree.body:
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict):
                topics = ast.literal_eval(node.value)
                return "\n\n".join(topics[k].strip() for k in sorted(topics))
    parts = [ast.get_docstring(tree) or ""]

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                if doc := ast.get_docstring(child):
                    parts.append(f"{module}.{name}\n\n{doc}")
                visit(child, name + ".")

    visit(tree, "")
    return "\n\n\n".join(p for p in parts if p.strip()).strip()


def stdlib_documents(
    split: str = "train", kinds: tuple[str, ...] = ("code", "prose"), max_bytes: int | None = None
) -> Iterator[Document]:
    """Documents of the stdlib corpus, module by module (code then prose), in hash order.

    ``max_bytes`` keeps whole documents, in order, while their UTF-8 total stays within it, and
    stops at the first that would not fit; since each module gives its code and its prose in turn,
    a capped corpus keeps about the full corpus's mix of the two.
    """
    if split not in ("train", "val", "all"):
        raise HerdError(f"stdlib split {split!r}: expected 'train', 'val' or 'all'")
    if not kinds or set(kinds) - set(KINDS):
        raise HerdError(f"stdlib kinds {kinds!r}: expected a non-empty subset of {KINDS}")
    total = 0
    for module, path in stdlib_modules():
        is_test = not TEST_DIRS.isdisjoint(module.split("."))
        wanted = {"tests"} if is_test else {"code", "prose"}
        if (split != "all" and split_of(module) != split) or wanted.isdisjoint(kinds):
            continue
        read = _read(path)
        if read is None:
            continue
        text, tree = read
        if "Character Mapping Codec" in text[:300]:  # gencodec.py's generated tables
            continue
        docs = {
            "code": text if module != PROSE_ONLY and not is_test else "",
            "prose": _prose(module, tree) if "prose" in kinds and not is_test else "",
            "tests": text if is_test else "",
        }
        for kind in kinds:
            if not docs[kind].strip():
                continue
            size = len(docs[kind].encode())
            if max_bytes is not None and total + size > max_bytes:
                return
            total += size
            yield Document(id=f"stdlib:{kind}:{module}", text=docs[kind], source=f"stdlib:{kind}")
