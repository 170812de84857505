"""`url_dedup`: of documents with the same URL (the input record's ``url`` field, kept in ``meta``),
the first in input order stays; every other one is removed as ``duplicate_url`` with ``duplicate_of``.
Documents without a URL are never removed here.

Global, as ``exact_dedup``: 8 bytes per document hashed in the workers, one entry per distinct URL in
the main process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from llamaherd.data.curate.base import Record
from llamaherd.data.curate.hashing import digest, first_occurrences


@dataclass
class UrlDedup:
    name: ClassVar[str] = "url_dedup"
    scope: ClassVar[str] = "global"
    field: str = "url"  # the meta field holding the URL
    ignore_case: bool = False  # compare URLs case-insensitively

    def scan(self, records: list[Record]) -> list[tuple[bytes | None, str]]:
        keys = []
        for r in records:
            url = r.meta.get(self.field)
            if isinstance(url, str) and url.strip():
                url = url.strip().lower() if self.ignore_case else url.strip()
                keys.append((digest(url), r.id))
            else:
                keys.append((None, r.id))
        return keys

    def plan(self, scans: list) -> list[dict[int, str]]:
        return first_occurrences(scans)

    def apply(self, records: list[Record], decision: dict[int, str]) -> list[tuple[str | None, dict | None]]:
        return [("duplicate_url", {"duplicate_of": decision[i]}) if i in decision else (None, None)
                for i in range(len(records))]
