"""``fineweb_quality``: FineWeb's own line rules (Penedo et al. 2024, "The FineWeb Datasets: Decanting the
Web for the Finest Text Data at Scale"), with the parameters, defaults, rule order and reasons of
datatrove's ``FineWebQualityFilter``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from llamaherd.data.curate.base import Record
from llamaherd.data.curate.text import (
    TERMINAL_PUNCTUATION,
    check_count,
    check_flag,
    check_ratio,
    check_strings,
    count_words,
    find_duplicates,
)


@dataclass
class FineWebQuality:
    """Remove a page made of fragments: lines without final punctuation, short lines, repeated lines,
    more line breaks than words can fill.

    Lines are the text's non-blank ``\\n``-separated lines (unstripped). In order, a page is removed when:

    - it has no such line (``empty``);
    - fewer than ``line_punct_thr`` of its lines end with one of ``stop_chars`` (default: the
      sentence-final characters of every script, ``text.TERMINAL_PUNCTUATION``) (``line_punct_ratio``);
      with ``line_punct_exclude_zero``, a page where no line does is spared;
    - more than ``short_line_thr`` of its lines are at most ``short_line_length`` characters long
      (``short_line_ratio``);
    - lines that repeat an earlier line hold more than ``char_duplicates_ratio`` of its characters
      (newlines not counted) (``char_dup_ratio``);
    - it has more than ``new_line_ratio`` newlines per word (spaCy's English words, ``text.words``)
      (``list_ratio``).

    Left out of datatrove's parameters: ``exclusion_writer`` (the pipeline writes removed records with
    their reason) and ``language`` (English word rules only).
    """

    name: ClassVar[str] = "fineweb_quality"
    line_punct_thr: float = 0.12
    line_punct_exclude_zero: bool = False
    stop_chars: tuple[str, ...] | None = None
    short_line_thr: float = 0.67
    short_line_length: int = 30
    char_duplicates_ratio: float = 0.01
    new_line_ratio: float = 0.3

    def __post_init__(self):
        for f in ("line_punct_thr", "short_line_thr", "char_duplicates_ratio", "new_line_ratio"):
            check_ratio(self.name, f, getattr(self, f), optional=False)
        check_flag(self.name, "line_punct_exclude_zero", self.line_punct_exclude_zero)
        check_count(self.name, "short_line_length", self.short_line_length, optional=False)
        stop = check_strings(self.name, "stop_chars", self.stop_chars)
        self._stop = tuple(sorted(TERMINAL_PUNCTUATION)) if stop is None else stop
        # single characters (the default): a set look-up of the last character beats endswith(tuple)
        self._stop_set = frozenset(self._stop) if all(len(c) == 1 for c in self._stop) else None

    def __call__(self, record: Record) -> str | None:
        text = record.text
        lines = [line for line in text.split("\n") if line.strip()]
        if not lines:
            return "empty"
        if self._stop_set is not None:
            ratio = sum(1 for line in lines if line[-1] in self._stop_set) / len(lines)
        else:
            ratio = sum(1 for line in lines if line.endswith(self._stop)) / len(lines)
        if ratio < self.line_punct_thr and not (ratio == 0 and self.line_punct_exclude_zero):
            return "line_punct_ratio"
        if sum(1 for line in lines if len(line) <= self.short_line_length) / len(lines) > self.short_line_thr:
            return "short_line_ratio"
        if find_duplicates(lines)[1] / (len(text) - text.count("\n")) > self.char_duplicates_ratio:
            return "char_dup_ratio"
        if text.count("\n") / count_words(text) > self.new_line_ratio:
            return "list_ratio"
        return None
