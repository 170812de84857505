"""Raw text to a clean JSONL corpus: read, clean, write atomically, report what was kept and why not.

    herd data clean --input data/ --out clean.jsonl --min-chars 32

Each output line is ``{"id": ..., "text": ..., "source": ...}``; ``read_documents`` reads it back.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from llamaherd.data.clean import CleanStats, clean_documents
from llamaherd.data.document import Document
from llamaherd.data.sources import read_documents
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
    check_limits(min_chars, max_chars)
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


def check_limits(min_chars: int, max_chars: int) -> None:
    if not 0 <= min_chars <= max_chars:
        raise HerdError(f"min_chars {min_chars} / max_chars {max_chars}: expected 0 <= min_chars <= max_chars")
