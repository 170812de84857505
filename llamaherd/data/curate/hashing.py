"""What the dedup stages share: a stable 8-byte digest, and "the first occurrence survives" (of equal keys,
or of a cluster of near duplicates)."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Hashable, Sequence

import numpy as np

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


class Clusters:
    """Documents numbered in input order, joined into clusters (union-find); a cluster's root is always
    its first document, the one that stays."""

    def __init__(self, n: int):
        self.parent = np.arange(n)

    def root(self, x: int) -> int:
        parent = self.parent
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = int(parent[x])
        return x

    def join(self, a: int, b: int) -> None:
        ra, rb = self.root(a), self.root(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def decisions(self, shard_sizes: Sequence[int], ids: Sequence[str]) -> list[dict[int, str]]:
        """For each shard, {position: id of its cluster's first document} for every document that is not
        the first of its cluster."""
        out, start = [], 0
        for size in shard_sizes:
            mine = {}
            for i in range(size):
                first = self.root(start + i)
                if first != start + i:
                    mine[i] = ids[first]
            out.append(mine)
            start += size
        return out
