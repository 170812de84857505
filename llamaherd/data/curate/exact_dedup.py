"""`exact_dedup`: of documents with the same text, the first in input order stays; every other one is
removed as ``duplicate`` with ``duplicate_of`` naming the one kept.

Global: each shard's worker hashes its documents (8 bytes each); the main process then walks the
hashes in input order, holding one entry per distinct text (~100 bytes with the kept id).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from llamaherd.data.curate.base import Record
from llamaherd.data.curate.hashing import collapse_whitespace, digest, first_occurrences


@dataclass
class ExactDedup:
    name: ClassVar[str] = "exact_dedup"
    scope: ClassVar[str] = "global"
    normalize_whitespace: bool = True  # texts that differ only in runs of whitespace are the same text

    def scan(self, records: list[Record]) -> list[tuple[bytes, str]]:
        norm = collapse_whitespace if self.normalize_whitespace else str
        return [(digest(norm(r.text)), r.id) for r in records]

    def plan(self, scans: list) -> list[dict[int, str]]:
        return first_occurrences(scans)

    def apply(self, records: list[Record], decision: dict[int, str]) -> list[tuple[str | None, dict | None]]:
        return [("duplicate", {"duplicate_of": decision[i]}) if i in decision else (None, None)
                for i in range(len(records))]
