"""`url_filter`: documents whose URL (``meta.url``) is on a block list, with the rules, parameters, order
and reasons of datatrove's URLFilter. A document is removed when, in this order:

- its registered domain (public-suffix aware: ``news.example.co.uk`` -> ``example.co.uk``) is a blocked
  domain (``domain``), or its full host name is (``subdomain``);
- the URL itself is a blocked URL (``url``);
- one of its words (runs of letters and digits) is a banned word (``hard_blacklisted``);
- at least ``soft_word_threshold`` of its words are soft-banned words (``soft_blacklisted``);
- its letters and digits, lowercased and run together, contain a banned subword (``blacklisted_subword``).

The integrated lists are datatrove's (blocklists.py: the UT1 adult blacklists and datatrove's keyword
lists, read from the installed package, never downloaded); ``extra_*`` lists add to them;
``use_integrated_lists = false`` uses only those. Documents without a URL are kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from llamaherd.data.curate import blocklists
from llamaherd.data.curate.base import Record
from llamaherd.errors import HerdError


@dataclass
class UrlFilter:
    name: ClassVar[str] = "url_filter"
    soft_word_threshold: int = 2
    extra_domains: list[str] | None = None
    extra_urls: list[str] | None = None
    banned_words: list[str] | None = None
    banned_subwords: list[str] | None = None
    soft_banned_words: list[str] | None = None
    use_integrated_lists: bool = True
    field: str = "url"  # the meta field holding the URL

    def __post_init__(self):
        if self.soft_word_threshold < 1:
            raise HerdError(f"url_filter.soft_word_threshold: expected >= 1, got {self.soft_word_threshold}")
        if self.use_integrated_lists:
            blocklists._assets()  # datatrove missing: say so before any work
            blocklists.domain_extractor()
        self._lists = None

    def __getstate__(self):  # the lists are built where they are used, not sent to every worker
        return {**self.__dict__, "_lists": None}

    def lists(self) -> dict:
        if self._lists is None:
            words = blocklists.keyword_lists() if self.use_integrated_lists else {}
            urls = blocklists.url_lists() if self.use_integrated_lists else {}
            norm = blocklists.normalize
            subwords = {norm(w) for w in self.banned_subwords or ()} | set(words.get("subwords", ()))
            self._lists = {
                "domains": urls.get("domains", frozenset()) | {d.strip() for d in self.extra_domains or ()},
                "urls": urls.get("urls", frozenset()) | {u.strip() for u in self.extra_urls or ()},
                "banned": words.get("banned", frozenset()) | {norm(w) for w in self.banned_words or ()},
                "soft": words.get("soft", frozenset()) | {norm(w) for w in self.soft_banned_words or ()},
                "subwords": blocklists.subword_pattern(subwords),
            }
        return self._lists

    def check(self, url: str) -> str | None:
        """The reason ``url`` is blocked, or None."""
        lists = self.lists()
        if lists["domains"]:
            host = blocklists.domain_extractor()(url)
            if host.top_domain_under_public_suffix in lists["domains"]:
                return "domain"
            if host.fqdn in lists["domains"]:
                return "subdomain"
        if url in lists["urls"]:
            return "url"
        words = blocklists.url_words(url)
        if not lists["banned"].isdisjoint(words):
            return "hard_blacklisted"
        if len(lists["soft"] & words) >= self.soft_word_threshold:
            return "soft_blacklisted"
        if lists["subwords"] is not None and lists["subwords"].search(blocklists.normalize(url)):
            return "blacklisted_subword"
        return None

    def __call__(self, record: Record) -> str | None:
        url = record.meta.get(self.field)
        return self.check(url) if isinstance(url, str) and url else None
