"""Basic cleaning: length limits and exact deduplication, with every removal counted by reason.

A document is removed as ``empty`` (only whitespace), ``too_short`` / ``too_long`` (characters
outside [min_chars, max_chars]) or ``duplicate`` (its text equals an earlier kept one once runs of
whitespace are collapsed), in that order of checks; everything else is kept. So
``stats.read == stats.kept + sum(stats.removed.values())`` always holds. With ``max_docs``, reading
stops once that many are kept: what is never read is not counted. The fuller curation pipeline
(quality, near-duplicates, mixing) builds on this.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from llamaherd.data.document import Document

REASONS = ("empty", "too_short", "too_long", "duplicate")


@dataclass
class CleanStats:
    read: int = 0
    read_bytes: int = 0
    kept: int = 0
    kept_bytes: int = 0
    removed: Counter = field(default_factory=Counter)  # reason -> documents

    def as_dict(self) -> dict:
        return {"read": self.read, "read_bytes": self.read_bytes, "kept": self.kept, "kept_bytes": self.kept_bytes,
                "removed": dict(sorted(self.removed.items(), key=lambda kv: _reason_order(kv[0])))}  # fmt: skip

    def table(self) -> str:
        """The stats as a small aligned text table, one row per outcome."""
        rows = [("read", self.read, self.read_bytes), ("kept", self.kept, self.kept_bytes)]
        rows += [(f"removed: {r}", self.removed[r], None) for r in sorted(self.removed, key=_reason_order)]
        return "\n".join(
            f"{name:<20}{n:>10,}" + (f"{b / 1e6:>12.2f} MB" if b is not None else "") for name, n, b in rows
        )


def _reason_order(reason: str) -> tuple[int, str]:
    return (REASONS.index(reason) if reason in REASONS else len(REASONS), reason)


def text_key(text: str) -> bytes:
    """The dedup key: a hash of the text with every run of whitespace made one space."""
    return hashlib.blake2b(" ".join(text.split()).encode(), digest_size=16).digest()


def clean_documents(
    docs: Iterable[Document],
    min_chars: int = 32,
    max_chars: int = 1_000_000,
    max_docs: int | None = None,
    seen: set[bytes] | None = None,
    dedup: bool = True,
) -> tuple[Iterator[Document], CleanStats]:
    """(kept documents, stats); the stats fill in as the iterator is consumed.

    ``seen`` holds dedup keys from elsewhere (e.g. the validation set, so that training keeps no
    copy of it); it is updated with the keys of the documents kept here. ``dedup=False`` applies the
    length limits only (what `herd run` does before its curation stages, which dedup).
    """
    stats = CleanStats()
    seen = set() if seen is None else seen

    def run() -> Iterator[Document]:
        if max_docs == 0:
            return
        for doc in docs:
            n_bytes = len(doc.text.encode())
            stats.read += 1
            stats.read_bytes += n_bytes
            reason = None
            if not doc.text.strip():
                reason = "empty"
            elif len(doc.text) < min_chars:
                reason = "too_short"
            elif len(doc.text) > max_chars:
                reason = "too_long"
            elif dedup:
                key = text_key(doc.text)
                if key in seen:
                    reason = "duplicate"
                seen.add(key)
            if reason:
                stats.removed[reason] += 1
                continue
            stats.kept += 1
            stats.kept_bytes += n_bytes
            yield doc
            if stats.kept == max_docs:
                return

    return run(), stats
