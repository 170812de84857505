"""``c4_quality``: the line and page rules of C4 (Raffel et al. 2020, "Exploring the Limits of Transfer
Learning with a Unified Text-to-Text Transformer", section 2.2, and its code in tensorflow_datasets'
``c4_utils``), with the parameters, defaults, rule order and reasons of datatrove's ``C4QualityFilter``."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

from llamaherd.data.curate.base import Record
from llamaherd.data.curate.text import check_count, check_flag, count_sentences, sentences

CITATION = re.compile(r"\[\d*]|\[edit]|\[citation needed]")  # Wikipedia's [1], [edit], [citation needed]
END_PUNCTUATION = (".", "?", "!", '"', "'")
POLICY_SUBSTRINGS = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")


@dataclass
class C4Quality:
    """Keep a page's lines that read like sentences; remove the page if too few remain, or if it shows
    placeholder text or code.

    The page is cut into lines (``split_paragraph``, the default) or into sentences. Each piece is
    stripped, then dropped when (in this order):

    - one of its whitespace-separated words is longer than ``max_word_length`` characters;
    - after Wikipedia citation marks are removed (``remove_citations``), it does not end with
      ``. ? ! " '`` or ends with ``...`` (``filter_no_terminal_punct``);
    - it has fewer than ``min_words_per_line`` words;
    - it mentions ``javascript`` (``filter_javascript``) or a cookie or terms-of-use phrase
      (``filter_policy``, ``POLICY_SUBSTRINGS``), case-insensitively.

    The page is removed when a piece that got that far contains ``lorem ipsum`` (case-insensitive;
    ``filter_lorem_ipsum``, reason ``lorem_ipsum``) or ``{`` (``filter_curly_bracket``, reason
    ``curly_bracket``), or when the kept lines hold fewer than ``min_num_sentences`` sentences
    (``too_few_sentences``). A kept page's text becomes its kept pieces, joined by newlines (by spaces
    when split into sentences). Sentences are spaCy's sentencizer's (``text.sentences``). A count of
    -1 turns its rule off. C4's bad-words rule is datatrove's C4BadWordsFilter, not part of this stage.

    Left out of datatrove's parameters: ``exclusion_writer`` (the pipeline writes removed records with
    their reason) and ``language`` (English sentence rules only).
    """

    name: ClassVar[str] = "c4_quality"
    split_paragraph: bool = True
    remove_citations: bool = True
    filter_no_terminal_punct: bool = True
    min_num_sentences: int = 5
    min_words_per_line: int = 3
    max_word_length: int = 1000
    filter_lorem_ipsum: bool = True
    filter_javascript: bool = True
    filter_curly_bracket: bool = True
    filter_policy: bool = True

    def __post_init__(self):
        for f in ("split_paragraph", "remove_citations", "filter_no_terminal_punct", "filter_lorem_ipsum",
                  "filter_javascript", "filter_curly_bracket", "filter_policy"):
            check_flag(self.name, f, getattr(self, f))
        for f in ("min_num_sentences", "min_words_per_line", "max_word_length"):
            check_count(self.name, f, getattr(self, f), optional=False, minimum=-1)

    def __call__(self, record: Record) -> str | None:
        pieces = record.text.splitlines() if self.split_paragraph else sentences(record.text)
        count = self.min_num_sentences != -1
        n_sentences = 0
        kept = []
        for line in pieces:
            line = line.strip()
            words = line.split()
            if self.max_word_length != -1 and any(len(w) > self.max_word_length for w in words):
                continue
            if self.remove_citations and "[" in line:
                line = CITATION.sub("", line)
            if self.filter_no_terminal_punct and (not line.endswith(END_PUNCTUATION) or line.endswith("...")):
                continue
            if len(words) < self.min_words_per_line:
                continue
            lower = line.lower()
            if self.filter_lorem_ipsum and "lorem ipsum" in lower:
                return "lorem_ipsum"
            if self.filter_javascript and "javascript" in lower:
                continue
            if self.filter_curly_bracket and "{" in line:
                return "curly_bracket"
            if self.filter_policy and any(p in lower for p in POLICY_SUBSTRINGS):
                continue
            if count:
                if not self.split_paragraph:
                    n_sentences += 1
                elif n_sentences < self.min_num_sentences:  # past the minimum the exact count does not matter
                    n_sentences += count_sentences(line, limit=self.min_num_sentences - n_sentences)
            kept.append(line)
        if n_sentences < self.min_num_sentences:
            return "too_few_sentences"
        record.text = ("\n" if self.split_paragraph else " ").join(kept).strip()
        return None
