"""`minhash_dedup`: near-duplicate documents by MinHash and locality-sensitive hashing (LSH).

Each document becomes a set of word 5-gram shingles (lowercased ``\\w+`` words), hashed to 64 bits;
``num_buckets x hashes_per_bucket`` multiply-shift hash functions ``((a x + b) mod 2^64) >> 32`` (a odd)
give its MinHash signature of 32-bit minimums. Two documents whose shingle sets have Jaccard
similarity s agree on one signature value with probability s (measured: no bias within 0.002), on a
whole band of r values with probability s^r, and so become candidates (share a bucket in at least one
of b bands) with probability

    P(s) = 1 - (1 - s^r)^b          (14 bands x 8 rows, FineWeb's default: P = 0.5 near s = 0.72)

Candidates are joined into connected components; in each, the first document in input order stays and
every other one is removed as ``near_duplicate``, with ``duplicate_of`` naming the one kept.
``threshold`` picks b and r for a target similarity instead (``choose_bands_rows``).

Global: workers compute signatures and hash each band to 8 bytes (b x 8 bytes per document); the main
process sorts each band's hashes (12 bytes per document and band while sorting) and joins equal ones,
so memory grows linearly with the number of documents (~170 bytes each at 14 bands, plus ids).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from llamaherd.data.curate.base import Record
from llamaherd.data.curate.hashing import Clusters
from llamaherd.errors import HerdError

_WORD = re.compile(r"\w+")
_MAX32 = np.uint64(0xFFFFFFFF)
_SHIFT = np.uint64(32)
_CHUNK = 4096  # shingles per block when taking minimums (bounds memory on very long documents)
_POLY = np.uint64(0x100000001B3)
_WORD_HASHES: dict[str, int] = {}  # per process: words recur across documents
_trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy >= 2 renamed it


def lsh_probability(s: float | np.ndarray, bands: int, rows: int):
    """The probability that two documents with Jaccard similarity ``s`` become candidates."""
    return 1.0 - (1.0 - np.asarray(s, dtype=float) ** rows) ** bands


def choose_bands_rows(threshold: float, num_perm: int, false_positive_weight: float = 0.5,
                      false_negative_weight: float = 0.5) -> tuple[int, int]:
    """(bands, rows) with bands x rows <= ``num_perm`` minimising the weighted area of false positives
    (candidates below ``threshold``) and false negatives (misses above it) under ``lsh_probability``."""
    if not 0.0 < threshold < 1.0:
        raise HerdError(f"minhash_dedup.threshold: expected a similarity between 0 and 1, got {threshold}")
    grid = np.linspace(0.0, 1.0, 2001)
    below, above = grid[grid < threshold], grid[grid >= threshold]
    best, best_cost = (1, 1), float("inf")
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            fp = _trapezoid(lsh_probability(below, bands, rows), below)
            fn = _trapezoid(1.0 - lsh_probability(above, bands, rows), above)
            cost = false_positive_weight * fp + false_negative_weight * fn
            if cost < best_cost:
                best, best_cost = (bands, rows), cost
    return best


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every bit of the input reaches every bit of the output."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _word_hash(word: str) -> int:
    h = _WORD_HASHES[word] = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little") | 1
    return h


def shingle_hashes(text: str, n_grams: int = 5) -> np.ndarray:
    """64-bit hashes of the distinct word n-grams of ``text`` (lowercased ``\\w+`` words); a document of
    fewer words is one shingle of all of them; an empty one has none."""
    words = _WORD.findall(text.lower())
    if not words:
        return np.zeros(0, dtype=np.uint64)
    if len(_WORD_HASHES) > 2_000_000:
        _WORD_HASHES.clear()
    word_hash = np.fromiter((_WORD_HASHES.get(w) or _word_hash(w) for w in words), dtype=np.uint64,
                            count=len(words))
    n = min(n_grams, len(words))
    m = len(words) - n + 1
    with np.errstate(over="ignore"):
        h = np.zeros(m, dtype=np.uint64)
        for j in range(n):  # a polynomial hash of the n words, wrapping at 2^64, then mixed
            h = h * _POLY + word_hash[j: j + m]
        return np.unique(_mix(h))


@dataclass
class MinhashDedup:
    name: ClassVar[str] = "minhash_dedup"
    scope: ClassVar[str] = "global"
    n_grams: int = 5  # words per shingle
    num_buckets: int = 14  # bands
    hashes_per_bucket: int = 8  # rows per band
    seed: int = 1  # draws the hash functions
    threshold: float | None = None  # choose bands and rows for this similarity (of num_buckets x hashes_per_bucket)

    def __post_init__(self):
        if self.n_grams < 1 or self.num_buckets < 1 or self.hashes_per_bucket < 1:
            raise HerdError("minhash_dedup: n_grams, num_buckets and hashes_per_bucket must be >= 1")
        if self.threshold is not None:
            self.num_buckets, self.hashes_per_bucket = choose_bands_rows(
                self.threshold, self.num_buckets * self.hashes_per_bucket)
            self.threshold = None  # now spelled out as bands and rows (what pipeline.json records)
        rng = np.random.default_rng(self.seed)
        num_perm = self.num_buckets * self.hashes_per_bucket
        self._a = rng.integers(0, 2**64, num_perm, dtype=np.uint64, endpoint=False) | np.uint64(1)  # odd
        self._b = rng.integers(0, 2**64, num_perm, dtype=np.uint64, endpoint=False)

    def signature(self, text: str) -> np.ndarray:
        """The document's MinHash signature: [num_buckets x hashes_per_bucket] 32-bit values (as uint64)."""
        shingles = shingle_hashes(text, self.n_grams)
        sig = np.full(len(self._a), _MAX32, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for start in range(0, len(shingles), _CHUNK):
                x = shingles[start: start + _CHUNK, None]
                values = (x * self._a + self._b) >> _SHIFT
                np.minimum(sig, values.min(axis=0), out=sig)
        return sig

    def band_hashes(self, signatures: np.ndarray) -> np.ndarray:
        """[N, bands x rows] signatures -> [N, bands] 64-bit hashes: equal bands, equal hashes (and
        unequal ones collide with probability 2^-64)."""
        bands = signatures.reshape(len(signatures), self.num_buckets, self.hashes_per_bucket)
        h = np.zeros(bands.shape[:2], dtype=np.uint64)
        with np.errstate(over="ignore"):
            for j in range(self.hashes_per_bucket):
                h = _mix(h * _POLY + bands[:, :, j])
        return h

    def scan(self, records: list[Record]) -> tuple[np.ndarray, list[str]]:
        signatures = np.zeros((len(records), len(self._a)), dtype=np.uint64)
        for i, r in enumerate(records):
            signatures[i] = self.signature(r.text)
        return self.band_hashes(signatures), [r.id for r in records]

    def plan(self, scans: list) -> list[dict[int, str]]:
        """Candidates (an equal band) joined into components; all but the first of each are removed."""
        hashes = np.concatenate([h for h, _ in scans]) if scans else np.zeros((0, self.num_buckets), np.uint64)
        ids = [i for _, shard_ids in scans for i in shard_ids]
        clusters = Clusters(len(ids))
        for band in range(self.num_buckets):
            order = np.argsort(hashes[:, band], kind="stable")
            values = hashes[order, band]
            starts = np.flatnonzero(np.r_[True, values[1:] != values[:-1]])
            ends = np.r_[starts[1:], len(values)]
            for s, e in zip(starts[ends - starts > 1], ends[ends - starts > 1]):
                first = int(order[s])
                for m in order[s + 1:e]:
                    clusters.join(first, int(m))
        return clusters.decisions([len(h) for h, _ in scans], ids)

    def apply(self, records: list[Record], decision: dict[int, str]) -> list[tuple[str | None, dict | None]]:
        return [("near_duplicate", {"duplicate_of": decision[i]}) if i in decision else (None, None)
                for i in range(len(records))]
