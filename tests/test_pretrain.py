"""Pretraining: exact resume after SIGKILL/SIGTERM, the document mask the model receives, bad input."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from llamaherd.checkpoint import runs as checkpointing
from llamaherd.checkpoint.native import read_safetensors, verify_checksums
from llamaherd.config import load_config
from llamaherd.data.pack import pack_documents
from llamaherd.tokenizer import Tokenizer
from llamaherd.train.pretrain import pretrain
from llamaherd.train.trainer import lr_at

STEPS = 12


@pytest.fixture(scope="module")
def corpus(byte_corpus):
    return byte_corpus


def recipe(corpus: Path, tmp: Path, **extra) -> Path:
    """A recipe file for a very small model on the packed corpus."""
    lines = [
        'name = "test"',
        "[model]", 'preset = "tiny"', "overrides = { dim = 64, n_layers = 2, n_heads = 4, n_kv_heads = 2, "
        "multiple_of = 32 }",
        "[data]", f'train_dir = "{corpus / "train"}"', f'val_dir = "{corpus / "val"}"',
        "[tokenizer]", f'path = "{corpus / "tokenizer.model"}"',
        "[train]", f"steps = {STEPS}", "batch_size = 4", "seq_len = 64", "warmup_steps = 2", "log_every = 1",
        "eval_every = 6", "eval_batches = 2", "lr = 0.003",
        "[checkpoint]", "every = 3", "keep = 10",
    ]
    path = tmp / "recipe.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def herd(*args, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "llamaherd.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **kw)


def logged(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def final_state(run: Path):
    ckpt = checkpointing.checkpoint_dirs(run)[0]
    verify_checksums(ckpt)
    weights = dict(read_safetensors(ckpt / "model.safetensors"))
    state = checkpointing.load_train_state(ckpt)
    return ckpt.name, weights, state


def assert_same_run(a: Path, b: Path) -> None:
    name_a, w_a, s_a = final_state(a)
    name_b, w_b, s_b = final_state(b)
    assert name_a == name_b == f"step_{STEPS:07d}"
    assert w_a.keys() == w_b.keys()
    for k in w_a:
        assert torch.equal(w_a[k], w_b[k]), f"weight {k} differs"
    opt_a, opt_b = s_a["optimizer"]["state"], s_b["optimizer"]["state"]
    assert opt_a.keys() == opt_b.keys()
    for i in opt_a:
        for k in opt_a[i]:
            assert torch.equal(opt_a[i][k], opt_b[i][k]), f"optimizer state {i}.{k} differs"
    assert s_a["loader"] == s_b["loader"]
    strip = ("tokens_per_s", "memory_gib", "mfu")  # wall-clock measurements
    rec_a = [{k: v for k, v in r.items() if k not in strip} for r in logged(a) if r.get("event") != "goodput"]
    rec_b = [{k: v for k, v in r.items() if k not in strip} for r in logged(b) if r.get("event") != "goodput"]
    assert rec_a == rec_b  # every logged loss, grad norm, lr and validation loss, bit for bit


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    run = tmp / "run"
    proc = herd("pretrain", str(recipe(corpus, tmp)), "--out", str(run), "--no-progress")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert [r["step"] for r in logged(run) if "loss" in r] == list(range(1, STEPS + 1))
    return run


def wait_for_step(run: Path, step: int, proc, timeout=120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (run / "metrics.jsonl").is_file():
            steps = [r.get("step", 0) for r in logged(run) if "loss" in r]
            if steps and steps[-1] >= step:
                return
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.01)
    raise AssertionError(f"step {step} not reached")


@pytest.mark.parametrize("kill_seed", [1, 2])
def test_sigkill_at_a_random_step_then_resume_is_bit_identical(corpus, uninterrupted, tmp_path, kill_seed):
    """Must show 1: SIGKILL mid-run, run the same command again: weights, optimizer, logged losses identical."""
    kill_at = random.Random(kill_seed).randint(2, STEPS - 2)
    run, rec = tmp_path / "run", recipe(corpus, tmp_path)
    proc = herd("pretrain", str(rec), "--out", str(run), "--no-progress")
    wait_for_step(run, kill_at, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    interrupted_at = max(r["step"] for r in logged(run) if "loss" in r)
    assert interrupted_at < STEPS, "the run finished before it was killed"

    proc = herd("pretrain", str(rec), "--out", str(run), "--no-progress")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert_same_run(uninterrupted, run)


def test_sigterm_checkpoints_and_stops_then_resumes_identically(corpus, uninterrupted, tmp_path):
    run, rec = tmp_path / "run", recipe(corpus, tmp_path)
    proc = herd("pretrain", str(rec), "--out", str(run), "--no-progress", "checkpoint.every=100")
    wait_for_step(run, 4, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "SIGTERM: checkpoint written" in err
    stopped = checkpointing.latest_good(run)
    assert stopped is not None and int(stopped.name.split("_")[1]) >= 4
    proc = herd("pretrain", str(rec), "--out", str(run), "--no-progress", "checkpoint.every=100")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert_same_run(uninterrupted, run)


def test_damaged_newest_checkpoint_is_skipped_for_the_previous_one(corpus, uninterrupted, tmp_path):
    run = tmp_path / "run"
    cfg = load_config(recipe(corpus, tmp_path))
    pretrain(cfg, run, progress=False)
    newest = checkpointing.checkpoint_dirs(run)[0]
    assert newest.name == f"step_{STEPS:07d}"
    with open(newest / "model.safetensors", "r+b") as f:  # truncate the newest checkpoint's weights
        f.truncate(100)
    warnings = []
    assert checkpointing.latest_good(run, warn=warnings.append).name == f"step_{STEPS - 3:07d}"
    assert newest.name in warnings[0] and "truncated" in warnings[0]
    # resuming starts from the previous one and still reproduces the uninterrupted run exactly
    result = pretrain(cfg, run, progress=False)
    assert result.resumed_from == STEPS - 3 and result.step == STEPS
    assert_same_run(uninterrupted, run)


def test_the_model_receives_a_mask_that_never_crosses_a_document(corpus, tmp_path, monkeypatch):
    """Must show 2: capture the attention mask of real training steps; it is exactly block-causal."""
    import llamaherd.model.transformer as transformer

    seen = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, **kw):
        seen.append((attn_mask, is_causal))
        return real_sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)

    inputs_seen = []
    real_forward = transformer.Transformer.forward

    def forward(self, tokens, *args, **kw):
        inputs_seen.append(tokens.clone())
        return real_forward(self, tokens, *args, **kw)

    monkeypatch.setattr(transformer.F, "scaled_dot_product_attention", spy)
    monkeypatch.setattr(transformer.Transformer, "forward", forward)
    tok = Tokenizer.from_file(corpus / "tokenizer.model")
    rng = random.Random(0)
    short_docs = ["".join(rng.choice("abcdef ") for _ in range(rng.randint(3, 40))) for _ in range(300)]
    pack_documents(short_docs, tok, tmp_path / "short", progress=False)
    cfg = load_config(recipe(corpus, tmp_path), ["train.steps=3", "train.eval_every=0",
                                                 f"data.train_dir={tmp_path / 'short'}"])
    pretrain(cfg, tmp_path / "run", progress=False)
    bos = tok.bos_id
    assert len(inputs_seen) == 3 and len(seen) == 3 * 2  # 3 steps x 2 layers
    crossings = 0
    for step, tokens in enumerate(inputs_seen):
        for mask, is_causal in seen[2 * step: 2 * step + 2]:
            assert not is_causal and mask is not None and mask.dtype == torch.bool
            for b in range(tokens.shape[0]):
                starts = (tokens[b] == bos).int().cumsum(0)  # documents begin with <|begin_of_text|>
                same_doc = starts[:, None] == starts[None, :]
                causal = torch.ones_like(same_doc).tril()
                assert torch.equal(mask[b, 0], same_doc & causal)
                crossings += int((starts[-1] - starts[0]) > 0)
    assert crossings > 0  # the rows really did hold several documents


def test_lr_schedule_warmup_then_cosine():
    cfg = load_config(None, ["train.lr=1.0", "train.warmup_steps=10", "train.steps=110", "train.min_lr_ratio=0.1"])
    t = cfg.train
    assert lr_at(5, t) == pytest.approx(0.5) and lr_at(10, t) == pytest.approx(1.0)
    assert lr_at(60, t) == pytest.approx(0.55) and lr_at(110, t) == pytest.approx(0.1)


# --- bad input: one line, and the last good checkpoint stays intact ----------------------------------

def cli(capsys, *args) -> tuple[int, str]:
    from llamaherd.cli import main

    code = main(list(args))
    err = capsys.readouterr().err.strip()
    return code, err


def test_unknown_recipe_key(capsys, corpus, tmp_path):
    code, err = cli(capsys, "pretrain", str(recipe(corpus, tmp_path)), "train.stepz=3", "--out", str(tmp_path / "r"))
    assert code == 2 and err.startswith("error: unknown recipe key 'train.stepz'") and "\n" not in err
    code, err = cli(capsys, "pretrain", str(recipe(corpus, tmp_path)), "model.bogus=3", "--out", str(tmp_path / "r"))
    assert code == 2 and "model.bogus" in err and "\n" not in err


def test_bad_input_keeps_the_last_good_checkpoint(capsys, corpus, tmp_path, monkeypatch):
    run, rec = tmp_path / "run", recipe(corpus, tmp_path)
    pretrain(load_config(rec, ["train.steps=3"]), run, progress=False)
    good = checkpointing.latest_good(run)

    # a tokenizer whose vocabulary does not match the packed data / model
    other = tmp_path / "other.model"
    Tokenizer.from_ranks({bytes([i]): i for i in range(256)} | {b"ab": 256}).save(other)
    code, err = cli(capsys, "pretrain", str(rec), f"tokenizer.path={other}", "--out", str(run))
    assert code == 2 and "vocabulary" in err and "513" in err and "\n" not in err

    # a checkpoint directory that cannot be written: the save fails, nothing is lost
    def no_space(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", no_space)
    code, err = cli(capsys, "pretrain", str(rec), "train.steps=6", "--out", str(run))
    assert err.splitlines()[0].startswith("resuming from")
    err = err.splitlines()[-1]
    assert code == 2 and err.startswith("error: cannot write checkpoint") and "No space left" in err
    monkeypatch.undo()
    verify_checksums(good)
    assert checkpointing.latest_good(run) == good
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # no temp dirs left

    # an output path that is not a directory at all
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, err = cli(capsys, "pretrain", str(rec), "--out", str(blocker / "run"))
    assert code == 2 and "cannot be written" in err


def test_corpus_smaller_than_one_row(capsys, corpus, tmp_path):
    tok = Tokenizer.from_file(corpus / "tokenizer.model")
    pack_documents(["tiny"], tok, tmp_path / "small", progress=False)
    code, err = cli(capsys, "pretrain", str(recipe(corpus, tmp_path)), f"data.train_dir={tmp_path / 'small'}",
                    "--out", str(tmp_path / "r"))
    assert code == 2 and "fewer" in err and "\n" not in err


def run_error(capsys, *args) -> str:
    """The error line of a failing `herd run` (its stage headings come before it on stderr)."""
    code, err = cli(capsys, "run", *args, "--no-progress")
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and err.splitlines()[-1] == errors[0] and "Traceback" not in err
    return errors[0]


def test_empty_or_unreadable_corpus_for_the_main_job(capsys, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    err = run_error(capsys, "tiny", f"data.inputs=[\"{empty}\"]", "data.val_inputs=[]", "--out", str(tmp_path / "r1"))
    assert str(empty) in err
    short = tmp_path / "short.jsonl"
    short.write_text('{"text": "x"}\n')
    err = run_error(capsys, "tiny", f"data.inputs=[\"{short}\"]", "data.val_inputs=[]", "--out", str(tmp_path / "r2"))
    assert "no document is within the length limits" in err and "the corpus is empty" in err
    err = run_error(capsys, "tiny", f"data.inputs=[\"{tmp_path / 'missing.txt'}\"]", "--out", str(tmp_path / "r3"))
    assert "missing.txt" in err


def test_activation_checkpointing_changes_memory_not_results(corpus, tmp_path):
    rec = recipe(corpus, tmp_path)
    plain = pretrain(load_config(rec, ["train.steps=3", "train.eval_every=0"]), tmp_path / "a", progress=False)
    ac = pretrain(load_config(rec, ["train.steps=3", "train.eval_every=0", "train.activation_checkpointing=true"]),
                  tmp_path / "b", progress=False)
    losses = [[r["loss"] for r in logged(run) if "loss" in r] for run in (plain.run_dir, ac.run_dir)]
    assert losses[0] == losses[1] and len(losses[0]) == 3
    _, w_a, _ = final_state(plain.run_dir)
    _, w_b, _ = final_state(ac.run_dir)
    assert all(torch.equal(w_a[k], w_b[k]) for k in w_a)
