"""The main job end to end on a small budget: raw text -> tokenizer -> packed data -> model -> report."""

import json

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
                 "corpus/train.jsonl", "corpus/val.jsonl", "corpus/clean_stats.json",
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
