"""`line_dedup`, as Llama 3 did: a line seen more than ``max_count`` times in a bucket of documents is
removed from every document of the bucket; a document stays unless it had lines removed and none is
left (then it is removed as ``empty_after_line_dedup``). ``meta.line_dedup_removed`` counts a document's removed lines.

A line is compared with its surrounding whitespace stripped; blank lines are never counted or removed.
Buckets are runs of ``bucket_docs`` documents in input order (Llama 3: 30M). Global: each shard's
worker hashes its lines (8 bytes each); the main process counts them per bucket, holding one entry per
distinct line of a bucket (~100 bytes), and hands each shard the frequent lines it contains.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import ClassVar

from llamaherd.data.curate.base import Record
from llamaherd.data.curate.hashing import digest
from llamaherd.errors import HerdError


def _line_keys(text: str) -> list[bytes | None]:
    """One key per line of ``text`` (``str.split("\\n")``): its digest, None for a blank line."""
    return [digest(s) if (s := line.strip()) else None for line in text.split("\n")]


@dataclass
class LineDedup:
    name: ClassVar[str] = "line_dedup"
    scope: ClassVar[str] = "global"
    max_count: int = 6  # a line seen more often than this in a bucket is removed everywhere in it
    bucket_docs: int = 30_000_000  # documents per bucket

    def __post_init__(self):
        if self.max_count < 1 or self.bucket_docs < 1:
            raise HerdError(f"line_dedup: max_count and bucket_docs must be >= 1, got {self.max_count}, "
                            f"{self.bucket_docs}")

    def scan(self, records: list[Record]) -> list[list[bytes]]:
        return [[k for k in _line_keys(r.text) if k is not None] for r in records]

    def plan(self, scans: list) -> list[tuple[int, dict[int, set[bytes]]]]:
        """Per shard: (index of its first document, {bucket: the frequent lines of that bucket it has})."""
        counts: dict[int, Counter] = {}
        start = 0
        for scan in scans:
            for i, keys in enumerate(scan):
                counts.setdefault((start + i) // self.bucket_docs, Counter()).update(keys)
            start += len(scan)
        frequent = {b: {k for k, n in c.items() if n > self.max_count} for b, c in counts.items()}
        decisions, start = [], 0
        for scan in scans:
            mine: dict[int, set[bytes]] = {}
            for i, keys in enumerate(scan):
                bucket = (start + i) // self.bucket_docs
                hits = frequent[bucket].intersection(keys)
                if hits:
                    mine.setdefault(bucket, set()).update(hits)
            decisions.append((start, mine))
            start += len(scan)
        return decisions

    def apply(self, records: list[Record], decision) -> list[tuple[str | None, dict | None]]:
        start, frequent = decision
        out = []
        for i, record in enumerate(records):
            drop = frequent.get((start + i) // self.bucket_docs)
            if not drop:
                out.append((None, None))
                continue
            lines = record.text.split("\n")
            keep = [line for line, key in zip(lines, _line_keys(record.text)) if key is None or key not in drop]
            removed = len(lines) - len(keep)
            if removed:
                record.text = "\n".join(keep)
                record.meta["line_dedup_removed"] = removed
            out.append(("empty_after_line_dedup", None) if removed and not record.text.strip() else (None, None))
        return out
