"""What the dedup stages share: a stable 8-byte digest, and "the first occurrence survives"."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Hashable, Sequence

_WHITESPACE = re.compile(r"\s+")


def digest(text: str) -> bytes:
    """An 8-byte BLAKE2b digest of ``text``: the same in every process and on every machine
    (Python's own ``hash`` of a string is salted per process)."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()


def collapse_whitespace(text: str) -> str:
    """Every run of whitespace as one space, and none at either end."""
    return _WHITESPACE.sub(" ", text).strip()


def first_occurrences(scans: Sequence[Sequence[tuple[Hashable | None, str]]]) -> list[dict[int, str]]:
    """Shards of (key, id) pairs in input order -> for each shard, {position: id of the first record
    with the same key} for every record that is not the first with its key. A key of None never matches."""
    first: dict[Hashable, str] = {}
    decisions = []
    for scan in scans:
        duplicates = {}
        for pos, (key, doc_id) in enumerate(scan):
            if key is None:
                continue
            if key in first:
                duplicates[pos] = first[key]
            else:
                first[key] = doc_id
        decisions.append(duplicates)
    return decisions
