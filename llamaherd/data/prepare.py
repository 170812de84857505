"""Raw text to a clean JSONL corpus: read, clean, write atomically, report what was kept and why not.

    herd data clean --input data/ --out clean.jsonl --min-chars 32

Each output line is ``{"id": ..., "text": ..., "source": ...}``; ``read_documents`` reads it back.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterable
from pathlib import Path

from llamaherd.data.clean import CleanStats, clean_documents
from llamaherd.data.sources import Document, add_input_argument, read_documents
from llamaherd.errors import HerdError

MIN_CHARS = 32
MAX_CHARS = 1_000_000


def write_jsonl(docs: Iterable[Document], path: str | Path) -> int:
    """Write documents as JSONL through a temporary file renamed into place; returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    n = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for doc in docs:
                f.write(json.dumps({"id": doc.id, "text": doc.text, "source": doc.source}, ensure_ascii=False) + "\n")
                n += 1
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return n


def prepare_corpus(
    inputs,
    out_dir: str | Path,
    min_chars: int = MIN_CHARS,
    max_chars: int = MAX_CHARS,
    val_inputs=None,
    text_field: str = "text",
) -> dict[str, CleanStats]:
    """Clean ``inputs`` into ``out_dir/train.jsonl`` (and ``val_inputs`` into ``out_dir/val.jsonl``).

    The validation set is cleaned first and training then drops every copy of a validation
    document, so the two never share a text. The stats are returned and also written to
    ``out_dir/clean_stats.json``.
    """
    _check_limits(min_chars, max_chars)
    out_dir = Path(out_dir)
    splits = {"val": val_inputs, "train": inputs}
    readers = {split: read_documents(x, text_field) for split, x in splits.items() if x is not None}  # checks paths
    seen: set[bytes] = set()
    stats = {}
    for split, docs in readers.items():
        kept, stats[split] = clean_documents(docs, min_chars, max_chars, seen=seen)
        write_jsonl(kept, out_dir / f"{split}.jsonl")
    record = {split: s.as_dict() for split, s in stats.items()}
    (out_dir / "clean_stats.json").write_text(json.dumps(record, indent=2) + "\n")
    return stats


def _check_limits(min_chars: int, max_chars: int) -> None:
    if not 0 <= min_chars <= max_chars:
        raise HerdError(f"min_chars {min_chars} / max_chars {max_chars}: expected 0 <= min_chars <= max_chars")


def add_cli(data_subparsers: argparse._SubParsersAction) -> None:
    """Add ``herd data clean``."""
    p = data_subparsers.add_parser(
        "clean",
        help="read raw text, drop empty/short/long/duplicate documents, write JSONL",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_input_argument(p)
    p.add_argument("--out", required=True, help="JSONL file to write (replaced atomically)")
    p.add_argument("--min-chars", type=int, default=MIN_CHARS, help="drop documents shorter than this")
    p.add_argument("--max-chars", type=int, default=MAX_CHARS, help="drop documents longer than this")
    p.add_argument("--max-docs", type=int, default=None, help="stop after keeping this many documents")
    p.set_defaults(func=_clean_cmd)


def _clean_cmd(args: argparse.Namespace) -> int:
    _check_limits(args.min_chars, args.max_chars)
    if args.max_docs is not None and args.max_docs < 0:
        raise HerdError(f"--max-docs {args.max_docs}: expected a number >= 0")
    docs = read_documents(args.input, text_field=args.text_field)
    kept, stats = clean_documents(docs, args.min_chars, args.max_chars, max_docs=args.max_docs)
    write_jsonl(kept, args.out)
    print(stats.table())
    print(f"wrote {args.out}: {stats.kept:,} documents, {stats.kept_bytes / 1e6:.2f} MB")
    return 0
