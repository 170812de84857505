"""Raw text in: documents from files, directories, globs, or the embedded stdlib corpus.

Formats, by file name: ``.txt`` (one document per file, UTF-8), ``.jsonl`` (one JSON object per
line, the text in ``text_field``; an ``id`` field, when present, becomes the document id) and
``.parquet`` (a ``text_field`` column; needs pyarrow), each optionally compressed as ``.gz`` or
``.zst`` (needs zstandard). Directories are walked and globs expanded in sorted order, so the same
inputs always give the same documents in the same order. The input name ``stdlib`` (the train
split), ``stdlib:train``, ``stdlib:val`` or ``stdlib:all`` is the embedded corpus of
``llamaherd.data.stdlib_corpus``; a file of that name can be given as ``./stdlib``.
"""

from __future__ import annotations

import glob
import gzip
import importlib
import io
import json
import os
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from llamaherd.data.document import Document
from llamaherd.errors import HerdError

FORMATS = (".txt", ".jsonl", ".parquet")
COMPRESSIONS = (".gz", ".zst")
STDLIB_SPLITS = {"stdlib": "train", "stdlib:train": "train", "stdlib:val": "val", "stdlib:all": "all"}


def file_format(path: str | Path) -> tuple[str, str] | None:
    """(format, compression) from a file name, e.g. ``("jsonl", ".gz")``; None if not a data file."""
    name = str(path).lower()
    compression = next((c for c in COMPRESSIONS if name.endswith(c)), "")
    name = name[: len(name) - len(compression)]
    fmt = next((f for f in FORMATS if name.endswith(f)), None)
    return (fmt[1:], compression) if fmt else None


def _walk(directory: str) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [os.path.join(dirpath, f) for f in sorted(filenames) if not f.startswith(".") and file_format(f)]
    return found


def resolve_inputs(inputs: str | Path | Iterable[str | Path]) -> list[str]:
    """Expand inputs into an ordered list of files and ``stdlib:*`` names; HerdError for anything unusable."""
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    resolved = []
    for item in map(str, inputs):
        if item in STDLIB_SPLITS:
            resolved.append(item)
        elif os.path.isdir(item):
            files = _walk(item)
            if not files:
                raise HerdError(f"{item}: directory has no {'/'.join(FORMATS)} files (optionally .gz/.zst)")
            resolved += files
        elif os.path.isfile(item):
            if not file_format(item):
                raise HerdError(f"{item}: unknown format; expected a {'/'.join(FORMATS)} file, optionally .gz/.zst")
            resolved.append(item)
        elif glob.has_magic(item):
            files = []
            for match in sorted(glob.glob(item, recursive=True)):
                files += _walk(match) if os.path.isdir(match) else [match] if file_format(match) else []
            if not files:
                raise HerdError(f"{item}: pattern matches no {'/'.join(FORMATS)} files (optionally .gz/.zst)")
            resolved += files
        else:
            raise HerdError(f"{item}: no such file or directory (nor 'stdlib', 'stdlib:train', 'stdlib:val')")
    if not resolved:
        raise HerdError("no inputs given: expected files, directories, globs or 'stdlib'")
    return resolved


OnError = Callable[[str, str], None]  # (where: "file:line" or "file", message) for a skipped input


def read_documents(inputs: str | Path | Iterable[str | Path], text_field: str = "text", *,
                   on_error: OnError | None = None, keep_fields: bool = False) -> Iterator[Document]:
    """Documents from every input in order. Paths are checked now; file contents as they are read.

    A malformed record (invalid UTF-8 or JSON, no text field, a text that is not a string) is an error;
    with ``on_error``, it is reported there (where, one-line message) and skipped instead, and so is
    the rest of a file that cannot be read on. ``keep_fields`` keeps a JSONL record's other fields
    (e.g. ``url``) in ``Document.meta``.
    """
    files = resolve_inputs(inputs)
    return _read_all(files, text_field, on_error, keep_fields)


def _read_all(files: list[str], text_field: str, on_error: OnError | None, keep_fields: bool) -> Iterator[Document]:
    n = 0
    for item in files:
        if item in STDLIB_SPLITS:
            from llamaherd.data.stdlib_corpus import stdlib_documents

            docs = stdlib_documents(STDLIB_SPLITS[item])
        else:
            docs = _read_file(item, text_field, on_error, keep_fields)
        for doc in docs:
            n += 1
            yield doc
    if n == 0:
        raise HerdError(f"no documents in {', '.join(files)}")


def _skip(e: HerdError, where: str, on_error: OnError | None) -> None:
    """Report a malformed input to ``on_error`` (then the caller skips it), or raise it without one."""
    if on_error is None:
        raise e
    on_error(where, str(e))


def _need(module: str, path: str):
    """Import an optional dependency, or say in one line which package reading ``path`` needs."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0]
        raise HerdError(f"{path}: reading this file needs the {package} package (pip install {package})") from None


def _read_file(path: str, text_field: str, on_error: OnError | None = None,
               keep_fields: bool = False) -> Iterator[Document]:
    fmt, compression = file_format(path)
    broken: tuple[type[BaseException], ...] = (OSError, EOFError, zlib.error)  # raised while reading
    if compression == ".zst":
        zstandard = _need("zstandard", path)
        broken += (zstandard.ZstdError,)
    if fmt == "parquet":
        _need("pyarrow.parquet", path)
        broken += (_need("pyarrow", path).ArrowException,)
    try:
        if compression == ".gz":
            f = gzip.open(path, "rb")
        elif compression == ".zst":
            # every frame: a file written in pieces (e.g. concatenated shards) holds several
            reader = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), read_across_frames=True)
            f = io.BufferedReader(reader)
        else:
            f = open(path, "rb")
        with f:
            if fmt == "txt":
                try:
                    yield Document(id=path, text=_utf8(f.read(), path), source=path)
                except HerdError as e:
                    _skip(e, path, on_error)
            elif fmt == "jsonl":
                yield from _read_jsonl(f, path, text_field, on_error, keep_fields)
            else:  # Parquet needs a seekable file
                yield from _read_parquet(io.BytesIO(f.read()) if compression else f, path, text_field, on_error)
    except broken as e:
        _skip(HerdError(f"{path}: cannot read ({type(e).__name__}: {e})"), path, on_error)


def _utf8(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise HerdError(f"{where}: invalid UTF-8 at byte {e.start}; expected UTF-8 text") from None


def _read_jsonl(f, path: str, text_field: str, on_error: OnError | None = None,
                keep_fields: bool = False) -> Iterator[Document]:
    for lineno, line in enumerate(f, 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            yield _jsonl_document(line, where, path, text_field, keep_fields)
        except HerdError as e:
            _skip(e, where, on_error)


def _jsonl_document(line: bytes, where: str, path: str, text_field: str, keep_fields: bool) -> Document:
    try:
        obj = json.loads(_utf8(line, where))
    except ValueError as e:
        raise HerdError(f"{where}: invalid JSON ({e}); expected one JSON object per line") from None
    if not isinstance(obj, dict):
        raise HerdError(f"{where}: a JSON {type(obj).__name__}; expected an object with a {text_field!r} field")
    if text_field not in obj:
        has = ", ".join(map(repr, list(obj)[:8])) or "none"
        raise HerdError(f"{where}: no {text_field!r} field (fields: {has}); expected the text there (--text-field)")
    text = obj[text_field]
    if not isinstance(text, str):
        raise HerdError(f"{where}: field {text_field!r} is a {type(text).__name__}; expected a string")
    doc_id = obj.get("id")
    meta = {}
    if keep_fields:  # a record curated before brings its annotations in "meta": they stay annotations
        meta = {**(obj["meta"] if isinstance(obj.get("meta"), dict) else {}),
                **{k: v for k, v in obj.items() if k not in (text_field, "id", "meta")}}
    return Document(id=str(doc_id) if isinstance(doc_id, (str, int)) else where, text=text, source=path, meta=meta)


def _read_parquet(f, path: str, text_field: str, on_error: OnError | None = None) -> Iterator[Document]:
    import pyarrow
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(f)
    names = pf.schema_arrow.names
    if text_field not in names:
        raise HerdError(f"{path}: no column {text_field!r} (columns: {', '.join(names)}); expected the text there")
    kind = pf.schema_arrow.field(text_field).type
    if not (pyarrow.types.is_string(kind) or pyarrow.types.is_large_string(kind)):
        raise HerdError(f"{path}: column {text_field!r} holds {kind}; expected strings")
    columns = [text_field] + (["id"] if "id" in names and text_field != "id" else [])
    row = 0
    for batch in pf.iter_batches(columns=columns, batch_size=1024):
        texts = batch.column(text_field).to_pylist()
        ids = batch.column("id").to_pylist() if "id" in columns else [None] * len(texts)
        for text, doc_id in zip(texts, ids, strict=True):
            if text is None:
                _skip(HerdError(f"{path}: row {row}: {text_field!r} is null; expected a string"), f"{path}:{row}",
                      on_error)
            else:
                yield Document(id=str(doc_id) if doc_id is not None else f"{path}:{row}", text=text, source=path)
            row += 1

