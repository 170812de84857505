"""The main job end to end on a small budget: raw text -> tokenizer -> packed data -> model -> report."""

import json
import random
import re

import pytest

import llamaherd
from llamaherd.train.run import run

SMALL = [
    "data.max_bytes=800000", "tokenizer.vocab_size=1024",
    "model.dim=128", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.multiple_of=32",
    "train.steps=300", "train.batch_size=8", "train.seq_len=128", "train.lr=0.006", "train.warmup_steps=20",
    "train.eval_every=150", "train.eval_batches=8", "checkpoint.every=150",
    "sample.max_new_tokens=40", 'sample.prompts=["def ", "import "]',
]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small is fastest on one thread
    try:
        out = tmp_path_factory.mktemp("run") / "tiny"
        summary = run("tiny", SMALL, str(out), progress=False)
    finally:
        torch.set_num_threads(threads)
    return out, summary


def test_run_directory_has_everything(finished_run):
    out, summary = finished_run
    for name in ("config.toml", "tokenizer.model", "metrics.jsonl", "report.md", "loss.png",
                 "corpus/raw.jsonl", "corpus/train.jsonl", "corpus/val.jsonl", "corpus/clean_stats.json",
                 "corpus/corpus_stats.json", "curation/stats.json", "curation/report.md", "curation/removals.png",
                 "data/train/meta.json", "data/val/meta.json"):
        assert (out / name).is_file(), name
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 300
    # the run directory loads like a checkpoint (its newest one) with the trained tokenizer
    model, tok = llamaherd.load(out)
    assert tok.n_words == 1024 + 256 == model.args.vocab_size
    assert model.args.dim == 128


def test_validation_loss_is_far_below_the_unigram_entropy(finished_run):
    out, summary = finished_run
    t = summary.train
    assert t.val_bpb is not None and summary.unigram_bpb is not None
    assert t.val_bpb < 0.85 * summary.unigram_bpb, (t.val_bpb, summary.unigram_bpb)
    report = (out / "report.md").read_text()
    assert f"{t.val_bpb:.4f} bits/byte" in report and f"{summary.unigram_bpb:.4f} bits/byte" in report
    assert "tokens/s" in report and "## Samples" in report
    assert f"| goodput (effective training time) | {t.goodput['effective']:.1%} of" in report


def test_samples_look_like_python(finished_run):
    out, summary = finished_run
    text = "".join(prompt + sample for prompt, sample in summary.samples)
    assert len(summary.samples) == 2 and all(s for _, s in summary.samples)
    # real words of Python, seen in the samples of even a briefly trained model
    assert sum(word in text for word in ("self", "return", "def ", "(", ":", "    ", "import", "=")) >= 4


def test_running_again_resumes_instead_of_redoing(finished_run):
    out, _ = finished_run
    before = (out / "tokenizer.model").stat().st_mtime_ns
    summary = run("tiny", SMALL, str(out), progress=False)
    assert summary.train.resumed_from == 300 and summary.train.step == 300
    assert summary.train.val_bpb == finished_run[1].train.val_bpb  # the report still has the numbers
    assert (out / "tokenizer.model").stat().st_mtime_ns == before


def test_reusing_a_run_directory_with_other_data_settings_is_refused(finished_run):
    from llamaherd.errors import HerdError

    out, _ = finished_run
    with pytest.raises(HerdError, match=r"other data settings \(tokenizer.vocab_size 1024 -> 2048\)"):
        run("tiny", [*SMALL, "tokenizer.vocab_size=2048"], str(out), progress=False)


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_curation_runs_the_recipe_stages_and_accounts_for_every_document(finished_run):
    from llamaherd.config import load_config
    from llamaherd.data.curate.pipeline import read_records

    out, summary = finished_run
    stats = json.loads((out / "curation" / "stats.json").read_text())
    recipe_stages = [t["name"] for t in load_config("tiny").curate.stages]
    assert [s["name"] for s in stats["stages"]] == recipe_stages
    assert "minhash_dedup" in recipe_stages and "line_dedup" not in recipe_stages  # chosen for code
    raw = _jsonl(out / "corpus" / "raw.jsonl")
    assert stats["input"]["documents"] == len(raw)
    removed = [r for path in sorted((out / "curation" / "removed").iterdir()) for r in read_records(path)]
    assert removed and all(r["stage"] in recipe_stages and r["reason"] for r in removed)
    assert all(r["duplicate_of"] for r in removed if r["stage"] == "minhash_dedup")
    for split in ("train", "val"):
        c = summary.corpus[split]
        kept = _jsonl(out / "corpus" / f"{split}.jsonl")
        # read = kept + removed by reason, the length limits and the curation stages together
        assert c["read"] == c["kept"] + sum(c["removed"].values()) and c["kept"] == len(kept)
        assert c["kept_bytes"] == sum(len(r["text"].encode()) for r in kept)
        n_removed = sum(n for reason, n in c["removed"].items() if ":" in reason)
        assert n_removed == sum(r["meta"]["split"] == split for r in removed)
        assert n_removed + len(kept) == sum(r["meta"]["split"] == split for r in raw)
        assert all(r["source"] in ("stdlib:code", "stdlib:prose") for r in kept)
    # normalize and pii ran: no carriage returns or trailing spaces, no author e-mail address left
    train = "\n".join(r["text"] for r in _jsonl(out / "corpus" / "train.jsonl"))
    assert "\r" not in train and " \n" not in train
    raw_text = "\n".join(r["text"] for r in raw)
    assert re.search(r"\w@python\.org", raw_text) and not re.search(r"\w@python\.org", train)
    assert "email@example.com" in train
    report = (out / "report.md").read_text()
    assert "## Curation" in report and "![documents removed by stage](curation/removals.png)" in report
    assert all(f"| {name} |" in report for name in recipe_stages)


def test_validation_text_repeated_in_training_is_removed_from_training(tmp_path):
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho".split()
    docs = [" ".join(random.Random(i).choices(words, k=200)) for i in range(12)]  # 5-grams shared by none
    val, train = tmp_path / "val.jsonl", tmp_path / "train.jsonl"
    val.write_text("".join(json.dumps({"id": f"v{i}", "text": t}) + "\n" for i, t in enumerate(docs[:2])))
    near_copy = docs[0].replace("alpha", "ALPHA", 1)  # one word changed: a near-duplicate of v0
    train.write_text("".join(json.dumps({"id": f"t{i}", "text": t}) + "\n"
                             for i, t in enumerate([docs[1], near_copy, *docs[2:]])))
    summary = run("tiny", [f"data.inputs=[\"{train}\"]", f"data.val_inputs=[\"{val}\"]", "data.max_bytes=0",
                           "tokenizer.vocab_size=300", "model.dim=32", "model.n_layers=1", "model.n_heads=2",
                           "model.n_kv_heads=1", "model.multiple_of=16", "train.steps=2", "train.batch_size=2",
                           "train.seq_len=64", "train.eval_every=2", "train.eval_batches=1", "sample.prompts=[]",
                           "curate.workers=1"], str(tmp_path / "run"), progress=False)
    assert summary.corpus["train"]["removed"] == {"exact_dedup: duplicate": 1, "minhash_dedup: near_duplicate": 1}
    assert [r["id"] for r in _jsonl(tmp_path / "run" / "corpus" / "train.jsonl")] == [f"train:t{i}"
                                                                                      for i in range(2, 12)]
    removed = [json.loads(line) for line in (tmp_path / "run" / "curation" / "removed" / "shard_00000.jsonl")
               .read_text().splitlines()]
    assert {r["id"]: r["duplicate_of"] for r in removed} == {"train:t0": "val:v1", "train:t1": "val:v0"}


def test_curation_settings_are_checked_before_any_work(tmp_path):
    from llamaherd.errors import HerdError

    with pytest.raises(HerdError, match=r"unknown curation stage 'bogus'"):
        run("tiny", ['curate.stages=[{"name": "bogus"}]'], str(tmp_path / "a"), progress=False)
    with pytest.raises(HerdError, match=r"unknown parameter 'nope' of stage 'minhash_dedup'"):
        run("tiny", ["curate.minhash_dedup.nope=1"], str(tmp_path / "b"), progress=False)
    with pytest.raises(HerdError, match=r"curate.gopher_quality.min_doc_words: no stage 'gopher_quality' in "
                                        r"curate.stages \(stages: normalize, language"):
        run("tiny", ["curate.gopher_quality.min_doc_words=5"], str(tmp_path / "c"), progress=False)
    assert not any(tmp_path.iterdir())  # nothing was made


def test_curation_parameter_override_reaches_the_stage():
    from llamaherd.config import load_config

    cfg = load_config("tiny", ["curate.minhash_dedup.threshold=0.8"])
    assert {"name": "minhash_dedup", "threshold": 0.8} in cfg.curate.stages
