"""`mix`: the proportions of the output, per domain or source, by down- and up-sampling from a seed.

Documents are grouped by ``by``: a field of ``meta`` (``domain``, from the domain stage; ``language``)
or ``source`` (the file a document came from). ``weights`` gives each group's target share of the
output (normalised to sum to 1); groups it does not name are removed as ``mix_unlisted``. The output
holds ``total`` documents, or, when ``total`` is unset, as many as the groups allow without repeating
any document. A group with more documents than its share keeps a random sample of them (the rest are
removed as ``mix_downsampled``); a group with fewer is repeated: every document ``k`` times and a
random few once more (Llama 3 up-sampled math and code this way). stats.json gives each group's
available documents, target and achieved share.

Global: workers read each document's group (a few bytes per document); the main process counts the
groups and draws the samples, one seeded generator per group.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from llamaherd.data.curate.base import Record
from llamaherd.errors import HerdError


@dataclass
class Mix:
    name: ClassVar[str] = "mix"
    scope: ClassVar[str] = "global"
    by: str = "domain"  # a meta field, or "source"
    weights: dict = field(default_factory=dict)  # group -> target share of the output (any positive scale)
    total: int | None = None  # documents in the output (None: the most without repeating any)
    seed: int = 0

    def __post_init__(self):
        if not self.weights:
            raise HerdError('mix.weights: name the groups to keep and their shares, e.g. mix.weights='
                            '\'{"code": 0.3, "prose": 0.7}\'')
        bad = {k: v for k, v in self.weights.items() if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0}
        if bad or not sum(self.weights.values()) > 0:
            raise HerdError(f"mix.weights: expected non-negative numbers with a positive sum, got {self.weights}")
        if self.total is not None and self.total < 1:
            raise HerdError(f"mix.total: expected a number of documents >= 1, got {self.total}")
        self.summary = None

    def _group(self, record: Record) -> str:
        value = record.source if self.by == "source" else record.meta.get(self.by)
        return "unknown" if value is None else str(value)

    def scan(self, records: list[Record]) -> list[str]:
        return [self._group(r) for r in records]

    def plan(self, scans: list[list[str]]) -> list[dict[int, tuple]]:
        groups = [g for scan in scans for g in scan]
        shares = {g: w / sum(self.weights.values()) for g, w in self.weights.items() if w > 0}
        members: dict[str, list[int]] = {g: [] for g in shares}
        for i, g in enumerate(groups):
            if g in members:
                members[g].append(i)
        available = {g: len(m) for g, m in members.items()}
        empty = [g for g in shares if available[g] == 0]
        if empty:
            raise HerdError(f"mix: no document in group(s) {', '.join(empty)} (by {self.by}); "
                            f"groups found: {', '.join(sorted(set(groups))) or 'none'}")
        if self.total is not None:
            total = self.total
        else:  # the largest output in which no group needs more documents than it has
            total = min((available[g] / p for g, p in shares.items()), default=0)
            total = int(total + 1e-9)
        wanted = _apportion(shares, total)
        copies = np.zeros(len(groups), dtype=np.int64)  # 0: removed
        for index, g in enumerate(sorted(shares)):
            idx = np.array(members[g], dtype=np.int64)
            rng = np.random.default_rng([self.seed, index])
            k, extra = divmod(wanted[g], len(idx))
            copies[idx] = k
            if extra:
                copies[rng.choice(idx, size=extra, replace=False)] += 1
        self.summary = {"by": self.by, "total": int(copies.sum()), "groups": {
            g: {"available": available[g], "target_share": round(shares[g], 6), "output": int(wanted[g]),
                "achieved_share": round(wanted[g] / max(int(copies.sum()), 1), 6)} for g in sorted(shares)}}
        decisions, start = [], 0
        for scan in scans:
            mine = {}
            for i, g in enumerate(scan):
                n = int(copies[start + i])
                if g not in shares:
                    mine[i] = ("mix_unlisted",)
                elif n == 0:
                    mine[i] = ("mix_downsampled",)
                elif n > 1:
                    mine[i] = (None, n)
            decisions.append(mine)
            start += len(scan)
        return decisions

    def apply(self, records: list[Record], decision: dict[int, tuple]) -> list[tuple[str | None, dict | None]]:
        out = []
        for i in range(len(records)):
            d = decision.get(i)
            if d is None:
                out.append((None, None))
            elif d[0] is not None:
                out.append((d[0], None))
            else:
                out.append((None, {"copies": d[1]}))
        return out


def _apportion(shares: dict[str, float], total: int) -> dict[str, int]:
    """Whole numbers of documents per group, summing to ``total``, as close to the shares as can be
    (largest remainders)."""
    exact = {g: p * total for g, p in shares.items()}
    counts = {g: int(x) for g, x in exact.items()}
    left = total - sum(counts.values())
    for g in sorted(exact, key=lambda g: (counts[g] - exact[g], g))[:left]:
        counts[g] += 1
    return counts
