"""`nsfw`: adult documents by "dirty word" counting (as Llama 3 did for adult sites that domain block
lists miss; C4's badwords rule), and by the URL block lists.

A document's words (runs of letters and digits, lowercased) are looked up in the dirty-word list:
datatrove's banned and soft-banned adult keywords (blocklists.py: shipped in its PyPI package, never
downloaded), plus ``extra_words``. It is removed as ``dirty_words`` when at least ``min_dirty_words``
of its words are dirty and they are more than ``max_dirty_ratio`` of its words (one stray word in a
long text is not enough; C4 removed any page with one). ``meta.dirty_words`` counts them. With
``check_urls``, a document whose ``meta.url`` ``url_filter`` would block is removed too, with that
stage's reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

from llamaherd.data.curate import blocklists
from llamaherd.data.curate.base import Record
from llamaherd.data.curate.url_filter import UrlFilter
from llamaherd.errors import HerdError

_WORDS = re.compile(r"[a-zA-Z0-9]+")


@dataclass
class Nsfw:
    name: ClassVar[str] = "nsfw"
    max_dirty_ratio: float = 0.01  # dirty words / words above this remove the document...
    min_dirty_words: int = 3  # ...if there are at least this many
    extra_words: list[str] | None = None
    use_integrated_lists: bool = True
    check_urls: bool = True  # also apply url_filter's block lists to meta.url

    def __post_init__(self):
        if not 0.0 <= self.max_dirty_ratio <= 1.0 or self.min_dirty_words < 1:
            raise HerdError("nsfw: max_dirty_ratio must be in [0, 1] and min_dirty_words >= 1")
        if not self.use_integrated_lists and not self.extra_words:
            raise HerdError("nsfw: without the integrated lists, give extra_words")
        self._urls = UrlFilter(use_integrated_lists=self.use_integrated_lists) if self.check_urls else None
        if self.use_integrated_lists:
            blocklists._assets()
        self._dirty = None

    def __getstate__(self):
        return {**self.__dict__, "_dirty": None}

    def __call__(self, record: Record) -> str | None:
        if self._dirty is None:
            lists = blocklists.keyword_lists() if self.use_integrated_lists else {}
            self._dirty = (lists.get("banned", frozenset()) | lists.get("soft", frozenset())
                           | {blocklists.normalize(w) for w in self.extra_words or ()})
        words = _WORDS.findall(record.text.lower())
        dirty = sum(w in self._dirty for w in words)
        if dirty:
            record.meta["dirty_words"] = dirty
        if dirty >= self.min_dirty_words and dirty > self.max_dirty_ratio * len(words):
            return "dirty_words"
        if self._urls is not None:
            url = record.meta.get("url")
            if isinstance(url, str) and url:
                return self._urls.check(url)
        return None
