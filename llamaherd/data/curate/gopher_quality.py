"""``gopher_quality``: the quality rules of Gopher (Rae et al. 2021, "Scaling Language Models: Methods,
Analysis & Insights from Training Gopher", appendix A), with the parameters, defaults, rule order and
reasons of datatrove's ``GopherQualityFilter``."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import ClassVar

from llamaherd.data.curate.base import Record
from llamaherd.data.curate.text import check_count, check_ratio, check_strings, chunk_stats, chunk_words

STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")


@dataclass
class GopherQuality:
    """Remove a document that does not look like prose, by word counts and line shapes.

    Words are spaCy's English words (``text.words``); a *symbol word* is one made only of punctuation.
    In order, a document is removed when (each rule off when its parameter is None or 0):

    - its non-symbol words are fewer than ``min_doc_words`` (``gopher_short_doc``) or more than
      ``max_doc_words`` (``gopher_long_doc``);
    - their mean length is below ``min_avg_word_length`` (``gopher_below_avg_threshold``) or above
      ``max_avg_word_length`` (``gopher_above_avg_threshold``);
    - ``#`` characters per word exceed ``max_symbol_word_ratio`` (``gopher_too_many_hashes``), or
      ``...`` and ``…`` per word do (``gopher_too_many_ellipsis``);
    - more than ``max_bullet_lines_ratio`` of its lines start with ``•`` or ``-`` after leading
      whitespace (``gopher_too_many_bullets``), or more than ``max_ellipsis_lines_ratio`` end with
      ``...`` or ``…`` (``gopher_too_many_end_ellipsis``);
    - fewer than ``max_non_alpha_words_ratio`` of its words contain a letter
      (``gopher_below_alpha_threshold``; datatrove's name for what is a minimum);
    - it contains fewer than ``min_stop_words`` distinct words of ``stop_words`` (case-sensitive;
      default ``STOP_WORDS``) (``gopher_enough_stop_words``).

    Left out of datatrove's parameters: ``exclusion_writer`` (the pipeline writes removed records
    with their reason) and ``language`` (words are split by English rules only; datatrove loads a
    tokenizer per language). A document without any word passes the ratio rules, where datatrove
    divides by zero.
    """

    name: ClassVar[str] = "gopher_quality"
    min_doc_words: int | None = 50
    max_doc_words: int | None = 100000
    min_avg_word_length: int | None = 3
    max_avg_word_length: int | None = 10
    max_symbol_word_ratio: float | None = 0.1
    max_bullet_lines_ratio: float | None = 0.9
    max_ellipsis_lines_ratio: float | None = 0.3
    max_non_alpha_words_ratio: float | None = 0.8
    min_stop_words: int | None = 2
    stop_words: list[str] | None = None

    def __post_init__(self):
        for f in ("min_doc_words", "max_doc_words", "min_avg_word_length", "max_avg_word_length", "min_stop_words"):
            check_count(self.name, f, getattr(self, f))
        for f in ("max_symbol_word_ratio", "max_bullet_lines_ratio", "max_ellipsis_lines_ratio",
                  "max_non_alpha_words_ratio"):
            check_ratio(self.name, f, getattr(self, f))
        stop = check_strings(self.name, "stop_words", self.stop_words)
        self._stop = frozenset(STOP_WORDS if stop is None else stop)

    def __call__(self, record: Record) -> str | None:
        text = record.text
        counts = Counter(text.split())
        n_words = n_kept = kept_chars = n_alpha = 0
        for chunk, k in counts.items():
            a, b, c, d = chunk_stats[chunk]
            n_words += a * k
            n_kept += b * k
            kept_chars += c * k
            n_alpha += d * k

        if self.min_doc_words and n_kept < self.min_doc_words:
            return "gopher_short_doc"
        if self.max_doc_words and n_kept > self.max_doc_words:
            return "gopher_long_doc"

        if n_kept:  # without a non-symbol word the mean is undefined and neither rule applies
            mean = kept_chars / n_kept
            if self.min_avg_word_length and mean < self.min_avg_word_length:
                return "gopher_below_avg_threshold"
            if self.max_avg_word_length and mean > self.max_avg_word_length:
                return "gopher_above_avg_threshold"

        if n_words and self.max_symbol_word_ratio:
            if text.count("#") / n_words > self.max_symbol_word_ratio:
                return "gopher_too_many_hashes"
            if (text.count("...") + text.count("…")) / n_words > self.max_symbol_word_ratio:
                return "gopher_too_many_ellipsis"

        if self.max_bullet_lines_ratio or self.max_ellipsis_lines_ratio:
            lines = text.splitlines()
            if lines and self.max_bullet_lines_ratio:
                bullets = sum(1 for s in lines if s.lstrip().startswith(("•", "-")))
                if bullets / len(lines) > self.max_bullet_lines_ratio:
                    return "gopher_too_many_bullets"
            if lines and self.max_ellipsis_lines_ratio:
                ending = sum(1 for s in lines if s.rstrip().endswith(("...", "…")))
                if ending / len(lines) > self.max_ellipsis_lines_ratio:
                    return "gopher_too_many_end_ellipsis"

        if n_words and self.max_non_alpha_words_ratio and n_alpha / n_words < self.max_non_alpha_words_ratio:
            return "gopher_below_alpha_threshold"

        if self.min_stop_words:
            found = set()
            for chunk in counts:
                found.update(self._stop.intersection(chunk_words[chunk]))
                if len(found) >= self.min_stop_words:
                    break
            else:
                return "gopher_enough_stop_words"
        return None
