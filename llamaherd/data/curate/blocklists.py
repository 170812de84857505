"""Block lists for ``url_filter`` and ``nsfw``: the ones datatrove ships inside its PyPI package (the UT1
blacklists' adult domains and URLs, compiled by the Université Toulouse 1 Capitole, and the banned,
soft-banned and banned-subword lists of adult keywords), read in place, never downloaded, plus
whatever a recipe adds. Loaded once per process, on first use (~4.6M domains: ~2 s, ~400 MB).

Public-suffix-aware domains come from tldextract's bundled suffix list (``suffix_list_urls=()``: no
fetch). Install both with ``pip install 'llamaherd[nsfw]'``.
"""

from __future__ import annotations

import os
import re
import tarfile
from functools import lru_cache

from llamaherd.errors import HerdError

EXTRA = "pip install 'llamaherd[nsfw]'"
_NON_ALNUM = re.compile(r"[^a-zA-Z0-9]+")


def normalize(text: str) -> str:
    """Lowercase letters and digits only, as datatrove compares URL words and list entries."""
    return _NON_ALNUM.sub("", text).lower()


def url_words(url: str) -> set[str]:
    """The words of a URL: its runs of letters and digits (case kept, as datatrove splits them)."""
    return set(_NON_ALNUM.split(url))


def _assets() -> str:
    try:
        from datatrove.utils._import_utils import ASSETS_PATH
    except ImportError:
        raise HerdError(f"the integrated block lists ship with datatrove ({EXTRA}); or set use_integrated_lists "
                        "= false and give your own lists") from None
    return ASSETS_PATH


def _read_list(path: str, normalized: bool) -> frozenset[str]:
    with open(path, encoding="utf-8") as f:
        return frozenset(normalize(x) if normalized else x.strip() for x in f if x.strip() and x[0] != "#")


@lru_cache(maxsize=1)
def keyword_lists() -> dict[str, frozenset[str]]:
    """{"banned": ..., "soft": ..., "subwords": ...}: datatrove's adult keyword lists, normalised."""
    assets = _assets()
    return {key: _read_list(os.path.join(assets, name), normalized=True)
            for key, name in (("banned", "banned_words.txt"), ("soft", "soft_banned_words.txt"),
                              ("subwords", "banned_subwords.txt"))}


@lru_cache(maxsize=1)
def url_lists() -> dict[str, frozenset[str]]:
    """{"domains": ..., "urls": ...}: the UT1 adult blacklists, read from datatrove's tarball in place."""
    path = os.path.join(_assets(), "url_filterblacklistsv0_3_0.tar.gz")
    found: dict[str, frozenset[str]] = {}
    with tarfile.open(path, "r:gz") as tar:
        for member in tar:
            name = os.path.basename(member.name)
            if name in ("domains", "urls") and member.isfile():
                lines = tar.extractfile(member).read().decode("utf-8", "replace").splitlines()
                found[name] = frozenset(s for line in lines if (s := line.strip()) and s[0] != "#")
    if set(found) != {"domains", "urls"}:
        raise HerdError(f"{path}: expected 'domains' and 'urls' lists in the archive")
    return found


@lru_cache(maxsize=1)
def domain_extractor():
    """tldextract with its bundled public suffix list only (no network)."""
    try:
        import tldextract
    except ImportError:
        raise HerdError(f"url_filter needs tldextract ({EXTRA})") from None
    return tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)


def subword_pattern(subwords) -> re.Pattern | None:
    """One regular expression that finds any of ``subwords`` (normalised) inside a normalised text."""
    words = sorted({w for w in subwords if w}, key=lambda w: (-len(w), w))
    return re.compile("|".join(map(re.escape, words))) if words else None
