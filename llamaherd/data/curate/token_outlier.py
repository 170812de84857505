"""`token_outlier`: documents made largely of tokens that the rest of the corpus never uses, as Llama 3
removed "documents containing excessive numbers of outlier tokens compared to the training corpus
distribution" (base64 and hex blobs, hashes, garbled encodings, long random identifiers).

Tokens are lowercased runs of letters and digits. A token is an outlier when it occurs at most
``max_outlier_count`` times in the whole corpus (1: once, in this document only). A document of at
least ``min_tokens`` tokens is removed as ``token_outliers`` when more than ``max_outlier_fraction`` of
its tokens are outliers; ``meta.outlier_token_fraction`` records the share for every document. Llama 3's
paper measures this with a KL divergence against the corpus's token distribution and gives no
settings; the share of corpus-unique tokens is the same idea, independent of document length.

Global: workers count their shards' tokens; the main process adds the counts (one entry per distinct
token of the corpus, ~100 bytes each) and hands each shard the outliers it contains.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import ClassVar

from llamaherd.data.curate.base import Record
from llamaherd.errors import HerdError

_TOKENS = re.compile(r"[^\W_]+")


def tokens(text: str) -> list[str]:
    return _TOKENS.findall(text.lower())


@dataclass
class TokenOutlier:
    name: ClassVar[str] = "token_outlier"
    scope: ClassVar[str] = "global"
    max_outlier_count: int = 1  # a token seen at most this many times in the corpus is an outlier
    max_outlier_fraction: float = 0.3  # documents with a larger share of outlier tokens are removed
    min_tokens: int = 20  # shorter documents are left alone

    def __post_init__(self):
        if self.max_outlier_count < 1 or self.min_tokens < 1 or not 0.0 <= self.max_outlier_fraction <= 1.0:
            raise HerdError("token_outlier: max_outlier_count and min_tokens must be >= 1, "
                            "max_outlier_fraction in [0, 1]")

    def scan(self, records: list[Record]) -> Counter:
        counts: Counter = Counter()
        for r in records:
            counts.update(tokens(r.text))
        return counts

    def plan(self, scans: list[Counter]) -> list[set[str]]:
        total: Counter = Counter()
        for counts in scans:
            total.update(counts)
        return [{t for t in counts if total[t] <= self.max_outlier_count} for counts in scans]

    def apply(self, records: list[Record], outliers: set[str]) -> list[tuple[str | None, dict | None]]:
        out = []
        for record in records:
            toks = tokens(record.text)
            share = sum(t in outliers for t in toks) / len(toks) if toks else 0.0
            record.meta["outlier_token_fraction"] = round(share, 4)
            removed = len(toks) >= self.min_tokens and share > self.max_outlier_fraction
            out.append(("token_outliers", None) if removed else (None, None))
        return out
