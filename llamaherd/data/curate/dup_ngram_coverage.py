"""`dup_ngram_coverage`: lines made of repeated content, such as logging or error messages, as Llama 3 removed
them with the duplicated n-gram coverage of Gopher (Rae et al., 2021), line by line. Such lines can be
long and unique, so line-level dedup does not catch them.

For every line of at least ``min_line_words`` words (split at whitespace), the word n-grams that repeat
an earlier n-gram of the same line, taken left to right without overlap, cover some of its characters;
when they cover more than ``max_coverage`` the line is removed. A document stays unless no line is left
(``empty_after_dup_ngram_coverage``); ``meta.dup_ngram_lines_removed`` counts a document's removed
lines. Llama 3's paper names the measure but not its settings: ``n_grams`` 5 is Gopher's smallest
duplicated n-gram; a line half made of repeats (0.5) is what we remove by default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from llamaherd.data.curate.base import Record
from llamaherd.errors import HerdError


def duplicated_coverage(words: list[str], n: int) -> float:
    """The share of the characters of ``words`` in n-grams that repeat an earlier n-gram (left to right,
    a repeat's words not counted twice)."""
    total = sum(map(len, words))
    if total == 0 or len(words) < n:
        return 0.0
    seen: set[tuple[str, ...]] = set()
    covered = [False] * len(words)
    i = 0
    while i + n <= len(words):
        gram = tuple(words[i: i + n])
        if gram in seen:
            for j in range(i, i + n):
                covered[j] = True
            i += n
        else:
            seen.add(gram)
            i += 1
    return sum(len(w) for w, c in zip(words, covered) if c) / total


@dataclass
class DupNgramCoverage:
    name: ClassVar[str] = "dup_ngram_coverage"
    n_grams: int = 5
    max_coverage: float = 0.5  # a line whose repeated n-grams cover more of its characters is removed
    min_line_words: int = 20  # shorter lines are left alone

    def __post_init__(self):
        if self.n_grams < 1 or self.min_line_words < 1 or not 0.0 <= self.max_coverage <= 1.0:
            raise HerdError("dup_ngram_coverage: n_grams and min_line_words must be >= 1, max_coverage in [0, 1]")

    def __call__(self, record: Record) -> str | None:
        lines = record.text.split("\n")
        keep = []
        for line in lines:
            words = line.split()
            if len(words) >= self.min_line_words and duplicated_coverage(words, self.n_grams) > self.max_coverage:
                continue
            keep.append(line)
        removed = len(lines) - len(keep)
        if not removed:
            return None
        record.text = "\n".join(keep)
        record.meta["dup_ngram_lines_removed"] = removed
        return "empty_after_dup_ngram_coverage" if not record.text.strip() else None
