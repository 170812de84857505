"""``gopher_repetition``: the repetition rules of Gopher (Rae et al. 2021, "Scaling Language Models: Methods,
Analysis & Insights from Training Gopher", appendix A, table A1), with the parameters, defaults, rule
order and reasons of datatrove's ``GopherRepetitionFilter``."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

from llamaherd.data.curate.base import Record
from llamaherd.data.curate.text import check_ratio, find_duplicates, ngrams
from llamaherd.errors import HerdError

_PARAGRAPHS = re.compile(r"\n{2,}")
_LINES = re.compile(r"\n+")


def _n_gram_rules(stage: str, name: str, value) -> tuple[tuple[int, float], ...]:
    """``[[n, fraction], ...]`` (a recipe's lists or datatrove's tuples) as a tuple of pairs; None is none."""
    if value is None:
        return ()
    try:
        pairs = tuple((n, frac) for n, frac in value)
    except (TypeError, ValueError):
        pairs = None
    if pairs is None or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 or isinstance(f, bool)
                            or not isinstance(f, (int, float)) or not f >= 0 for n, f in pairs):
        raise HerdError(f"{stage}.{name} = {value!r}: expected pairs [n, fraction] with n >= 1 and fraction >= 0")
    return pairs


@dataclass
class GopherRepetition:
    """Remove a document that repeats itself: duplicated paragraphs and lines, n-grams that dominate.

    In order, a document is removed when (a fraction rule is off when its parameter is None or 0):

    - it is empty (``empty``);
    - more than ``dup_para_frac`` of its paragraphs (split at blank lines) repeat an earlier one
      (``dup_para_frac``), or those repeats hold more than ``dup_para_char_frac`` of its characters
      (``dup_para_char_frac``);
    - the same for lines, with ``dup_line_frac`` and ``dup_line_char_frac``;
    - for each ``(n, fraction)`` of ``top_n_grams``: the most frequent n-gram of words (joined by
      spaces) times its count is more than ``fraction`` of the characters (``top_{n}_gram``);
    - for each ``(n, fraction)`` of ``dup_n_grams``: the n-grams that repeat an earlier one (joined
      without spaces, counted left to right without overlap) hold more than ``fraction`` of the
      characters (``duplicated_{n}_n_grams``).

    Words are spaCy's English words (``text.words``); n-grams are compared by 64-bit hashes
    (``text.NGrams``). Left out of datatrove's parameters: ``exclusion_writer`` (the pipeline writes
    removed records with their reason) and ``language`` (English word rules only). ``top_n_grams``
    and ``dup_n_grams`` also take lists of ``[n, fraction]`` (a recipe's TOML) or None for none.
    """

    name: ClassVar[str] = "gopher_repetition"
    dup_line_frac: float | None = 0.3
    dup_para_frac: float | None = 0.3
    dup_line_char_frac: float | None = 0.2
    dup_para_char_frac: float | None = 0.2
    top_n_grams: tuple[tuple[int, float], ...] | None = ((2, 0.2), (3, 0.18), (4, 0.16))
    dup_n_grams: tuple[tuple[int, float], ...] | None = ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11),
                                                         (10, 0.10))

    def __post_init__(self):
        for f in ("dup_line_frac", "dup_para_frac", "dup_line_char_frac", "dup_para_char_frac"):
            check_ratio(self.name, f, getattr(self, f))
        self.top_n_grams = _n_gram_rules(self.name, "top_n_grams", self.top_n_grams)
        self.dup_n_grams = _n_gram_rules(self.name, "dup_n_grams", self.dup_n_grams)

    def __call__(self, record: Record) -> str | None:
        text = record.text
        if not text:
            return "empty"
        size = len(text)

        paragraphs = _PARAGRAPHS.split(text.strip())
        n_dup, dup_chars = find_duplicates(paragraphs)
        if self.dup_para_frac and n_dup / len(paragraphs) > self.dup_para_frac:
            return "dup_para_frac"
        if self.dup_para_char_frac and dup_chars / size > self.dup_para_char_frac:
            return "dup_para_char_frac"

        lines = _LINES.split(text)
        n_dup, dup_chars = find_duplicates(lines)
        if self.dup_line_frac and n_dup / len(lines) > self.dup_line_frac:
            return "dup_line_frac"
        if self.dup_line_char_frac and dup_chars / size > self.dup_line_char_frac:
            return "dup_line_char_frac"

        if not self.top_n_grams and not self.dup_n_grams:
            return None
        grams = ngrams(text)
        for n, frac in self.top_n_grams:
            if grams.n_words >= n and grams.top_chars(n) / size > frac:
                return f"top_{n}_gram"
        if self.dup_n_grams and grams.any_repeated(n for n, _ in self.dup_n_grams):
            for n, frac in self.dup_n_grams:
                if grams.repeated_over(n, frac, size):
                    return f"duplicated_{n}_n_grams"
        return None
