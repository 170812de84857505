"""url_filter against datatrove's URLFilter (same block lists, same decisions and reasons); nsfw's dirty words."""

import json
import random

import pytest

from llamaherd.data.curate import blocklists
from llamaherd.data.curate.base import Record
from llamaherd.data.curate.nsfw import Nsfw
from llamaherd.data.curate.pipeline import curate, load_pipeline, read_records
from llamaherd.data.curate.url_filter import UrlFilter
from llamaherd.errors import HerdError

CLEAN = ["https://docs.python.org/3/library/re.html", "https://en.wikipedia.org/wiki/Llama",
         "http://www.example.co.uk/news/2024/05/budget-plans", "https://github.com/pytorch/pytorch/issues/1",
         "https://arxiv.org/abs/2407.21783", "https://blog.example.com/posts/how-to-bake-bread?page=2"]


@pytest.fixture(scope="module")
def urls():
    """Clean URLs, and URLs that each rule blocks: listed domains (and hosts under them), listed URLs,
    banned and soft-banned words, banned subwords."""
    rng = random.Random(0)
    lists, words = blocklists.url_lists(), blocklists.keyword_lists()
    domains = sorted(rng.sample(sorted(lists["domains"]), 150))
    out = list(CLEAN)
    out += [f"https://{d}/{rng.choice(['', 'index.html', 'a/b?c=1'])}" for d in domains[:100]]
    out += [f"http://www.{d}/page" for d in domains[100:]]
    out += rng.sample(sorted(lists["urls"]), 50)  # as the list writes them (no scheme): datatrove compares exactly
    out += [f"https://site{i}.example.org/{w}/gallery" for i, w in enumerate(sorted(words["banned"])[:40])]
    soft = sorted(words["soft"])
    out += [f"https://example.net/{a}-{b}" for a, b in zip(soft[:30], soft[30:60])]
    out += [f"https://example.net/only-{a}" for a in soft[:20]]
    out += [f"https://example.org/x{s.replace(' ', '')}y" for s in sorted(words["subwords"])[:30]]
    out += [f"https://example.org/{rng.choice(['news', 'shop', 'docs'])}/{i}" for i in range(100)]
    return out


def datatrove_filter(tmp_path, monkeypatch):
    """datatrove's URLFilter, offline: its block lists unpacked under tmp_path (not the home cache), and
    tldextract's bundled suffix list instead of a fetch."""
    import datatrove.pipeline.filters.url_filter as dt

    monkeypatch.setattr(dt, "cached_assets_path", lambda **kw: str(tmp_path))
    f = dt.URLFilter()
    f.tldextractor = blocklists.domain_extractor()
    return f


@pytest.mark.filterwarnings("ignore:The 'registered_domain' property is deprecated:DeprecationWarning")  # datatrove's
def test_url_filter_makes_datatrove_s_decisions(tmp_path, monkeypatch, urls):
    from datatrove.data import Document

    theirs = datatrove_filter(tmp_path, monkeypatch)
    ours = UrlFilter()
    disagree = []
    reasons = set()
    for i, url in enumerate(urls):
        result = theirs.filter(Document(text="x", id=str(i), metadata={"url": url}))
        want = None if result is True else result[1]
        got = ours(Record(str(i), "x", "s", {"url": url}))
        reasons.add(got)
        if got != want:
            disagree.append((url, got, want))
    assert disagree == []
    assert reasons == {None, "domain", "subdomain", "url", "hard_blacklisted", "soft_blacklisted",
                       "blacklisted_subword"}  # every rule was exercised


def test_own_lists_without_the_integrated_ones():
    f = UrlFilter(use_integrated_lists=False, extra_domains=["bad-site.com"], extra_urls=["http://x.org/a"],
                  banned_words=["casino"], soft_banned_words=["cheap", "pills"], banned_subwords=["freemoney"])
    assert f(Record("1", "t", "s", {"url": "https://www.bad-site.com/x"})) == "domain"
    assert f(Record("2", "t", "s", {"url": "http://x.org/a"})) == "url"
    assert f(Record("3", "t", "s", {"url": "https://ok.org/casino/1"})) == "hard_blacklisted"
    assert f(Record("4", "t", "s", {"url": "https://ok.org/cheap-pills"})) == "soft_blacklisted"
    assert f(Record("5", "t", "s", {"url": "https://ok.org/cheap-bread"})) is None
    assert f(Record("6", "t", "s", {"url": "https://ok.org/get-free-money-now"})) == "blacklisted_subword"
    assert f(Record("7", "t", "s")) is None  # no URL: kept
    with pytest.raises(HerdError, match="soft_word_threshold"):
        UrlFilter(soft_word_threshold=0)


def test_nsfw_counts_dirty_words_and_checks_urls(tmp_path):
    dirty = sorted(blocklists.keyword_lists()["banned"])[:5]
    clean = "the council met on tuesday to discuss the new library budget and the park".split()

    def text(n_dirty, n_words):
        words = (clean * (n_words // len(clean) + 1))[: n_words - n_dirty] + dirty[:n_dirty]
        return " ".join(words)

    stage = Nsfw()
    assert stage(Record("a", text(5, 100), "s")) == "dirty_words"
    r = Record("b", text(2, 100), "s")
    assert stage(r) is None and r.meta["dirty_words"] == 2  # fewer than min_dirty_words
    assert stage(Record("c", text(3, 1000), "s")) is None  # 0.3% of the words
    assert stage(Record("d", text(0, 50), "s", {"url": "https://www.example.org/casino"})) is None
    blocked = sorted(blocklists.url_lists()["domains"])[0]
    assert stage(Record("e", text(0, 50), "s", {"url": f"https://{blocked}/"})) == "domain"
    assert Nsfw(check_urls=False)(Record("f", text(0, 50), "s", {"url": f"https://{blocked}/"})) is None
    # through the pipeline, in worker processes that load the lists themselves
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "ok", "text": text(0, 80), "url": "https://example.org/news"},
        {"id": "words", "text": text(6, 80)},
        {"id": "site", "text": text(0, 80), "url": f"https://{blocked}/home"}]))
    curate(load_pipeline(stages=["nsfw"], overrides=["output.shard_docs=1"]), [src], tmp_path / "out", workers=2)
    removed = [r for p in sorted((tmp_path / "out" / "removed").iterdir()) for r in read_records(p)]
    assert [(r["id"], r["reason"]) for r in removed] == [("words", "dirty_words"), ("site", "domain")]
    with pytest.raises(HerdError, match="give extra_words"):
        Nsfw(use_integrated_lists=False)
