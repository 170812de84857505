"""Distributed pretraining on CPU with gloo, in real torchrun processes: every layout trains the model one
process trains, a checkpoint resumes under another layout, and impossible layouts are one-line errors.

Tolerances: the layouts add the same numbers in other orders (sharded reductions, other matmul splits, one
OpenMP thread per process against two), so losses agree to float32 rounding, not bit for bit: within 1e-5
relative over 10 steps (measured: below 1e-6). Weights after 10 AdamW steps within 1e-4 (Adam divides
tiny gradient differences by tiny second moments; measured below 1e-5).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llamaherd
from llamaherd.checkpoint import runs
from llamaherd.checkpoint.native import read_safetensors
from llamaherd.config import ParallelConfig
from llamaherd.errors import HerdError
from llamaherd.model.args import preset
from llamaherd.train.distributed import Layout, plan_layout

pytestmark = pytest.mark.slow

STEPS = 10
TESTS = Path(__file__).parent


def settings(corpus: Path, steps: int = STEPS, **extra) -> list[str]:
    base = {"model.dim": 64, "model.n_layers": 4, "model.n_heads": 4, "model.n_kv_heads": 2, "model.multiple_of": 32,
            "model.tie_embeddings": "false", "data.train_dir": corpus / "train", "data.val_dir": corpus / "val",
            "tokenizer.path": corpus / "tokenizer.model", "train.steps": steps, "train.batch_size": 8,
            "train.seq_len": 64, "train.warmup_steps": 2, "train.log_every": 1, "train.eval_every": 5,
            "train.eval_batches": 3, "train.lr": 0.003, "checkpoint.every": 5, "checkpoint.keep": 5, **extra}
    return [f"{k}={v}" for k, v in base.items()]


def env() -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def torchrun(nproc: int, *args, timeout: int = 300) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node N ...`` on this machine (torchrun is ``python -m torch.distributed.run``)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env())


def pretrain(nproc: int, out: Path, overrides: list[str]) -> subprocess.CompletedProcess:
    """The launch contract: ``torchrun --nproc-per-node N -m llamaherd pretrain RECIPE --out DIR key=value``."""
    proc = torchrun(nproc, "-m", "llamaherd", "pretrain", "tiny", *overrides, "--out", str(out), "--no-progress")
    assert proc.returncode == 0, proc.stderr[-8000:]
    return proc


def records(run: Path) -> tuple[list[float], list[float]]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if "loss" in r], [r["val_loss"] for r in lines if "val_loss" in r]


def weights(run: Path, step: int = STEPS) -> dict[str, torch.Tensor]:
    return dict(read_safetensors(runs.step_dir(run, step) / "model.safetensors"))


@pytest.fixture(scope="module")
def reference(byte_corpus, tmp_path_factory):
    """One process, the same recipe."""
    out = tmp_path_factory.mktemp("one") / "run"
    pretrain(1, out, settings(byte_corpus))
    return out


LAYOUTS = {
    "fsdp": (2, []),
    "tp": (2, ["parallel.tp=2"]),
    "pp-1f1b": (2, ["parallel.pp=2"]),
    "pp-gpipe": (2, ["parallel.pp=2", "parallel.pp_schedule=GPipe"]),
    "fsdp-x-tp": (4, ["parallel.tp=2"]),
    "hsdp": (4, ["parallel.dp_replicate=2"]),
    "pp-x-fsdp": (4, ["parallel.pp=2"]),
    "pp-interleaved-x-tp": (4, ["parallel.pp=2", "parallel.tp=2", "parallel.pp_schedule=Interleaved1F1B",
                                "parallel.microbatches=4"]),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_every_layout_trains_the_model_one_process_trains(name, byte_corpus, reference, tmp_path):
    nproc, layout = LAYOUTS[name]
    out = tmp_path / "run"
    pretrain(nproc, out, settings(byte_corpus) + layout)
    losses, vals = records(out)
    ref_losses, ref_vals = records(reference)
    assert len(losses) == STEPS and len(vals) == 2
    assert losses == pytest.approx(ref_losses, rel=1e-5) and vals == pytest.approx(ref_vals, rel=1e-5)
    ours, theirs = weights(out), weights(reference)  # the checkpoint holds the whole model, gathered
    assert ours.keys() == theirs.keys()
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=1e-4, msg=lambda m, k=k: f"{k}: {m}")


def test_a_checkpoint_saved_at_dp4_resumes_at_dp2_x_tp2(byte_corpus, tmp_path):
    # trained to step 5, then on to 10 (the schedule's length changes at 5 the same way for both runs)
    one, out = tmp_path / "one", tmp_path / "run"
    pretrain(1, one, settings(byte_corpus, steps=5))
    pretrain(1, one, settings(byte_corpus))
    pretrain(4, out, settings(byte_corpus, steps=5))  # FSDP over 4 ranks, 2 rows each
    proc = pretrain(4, out, settings(byte_corpus) + ["parallel.tp=2"])  # FSDP over 2 x TP 2, 4 rows each
    assert "resuming from" in proc.stdout + proc.stderr and "(step 5)" in proc.stdout + proc.stderr
    losses, vals = records(out)
    ref_losses, ref_vals = records(one)
    assert len(losses) == STEPS and losses == pytest.approx(ref_losses, rel=1e-5)  # steps 6..10: the next ones
    assert vals == pytest.approx(ref_vals, rel=1e-5)


def test_sharded_checkpoints_resume_under_another_layout_and_export_to_one_file(byte_corpus, tmp_path):
    # every rank writes its own shards (torch.distributed.checkpoint), in the background at dp=4; resumed as
    # dp 2 x tp 2 (DCP reshards); the same run one process made with whole checkpoints
    one, out = tmp_path / "one", tmp_path / "run"
    pretrain(1, one, settings(byte_corpus, steps=5))
    pretrain(1, one, settings(byte_corpus))
    sharded = ["checkpoint.sharded=true"]
    pretrain(4, out, settings(byte_corpus, steps=5) + sharded + ["checkpoint.async_save=true"])
    assert (runs.step_dir(out, 5) / "dcp" / ".metadata").is_file()
    assert not (runs.step_dir(out, 5) / "model.safetensors").exists()
    proc = pretrain(4, out, settings(byte_corpus) + sharded + ["parallel.tp=2"])
    assert "(step 5)" in proc.stdout + proc.stderr
    assert records(out)[0] == pytest.approx(records(one)[0], rel=1e-5)
    # herd convert reads the shards into one Hugging Face checkpoint, which gives the one-process model's logits
    hf = tmp_path / "hf"
    convert = subprocess.run([sys.executable, "-m", "llamaherd", "convert", str(out), str(hf), "--to", "hf"],
                             capture_output=True, text=True, timeout=300, env=env())
    assert convert.returncode == 0, convert.stderr[-2000:]
    theirs, _ = llamaherd.load(one)
    ours, _ = llamaherd.load(hf)
    tokens = torch.arange(128).reshape(2, 64) % 251
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), theirs(tokens), rtol=1e-4, atol=1e-4)


def test_the_checkpoint_of_a_distributed_model_gives_its_logits(byte_corpus, tmp_path):
    worker = TESTS / "dist_worker.py"
    proc = torchrun(4, str(worker), str(tmp_path), "3", *settings(byte_corpus), "model.tie_embeddings=true",
                    "parallel.tp=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    gathered = torch.load(tmp_path / "logits.pt")
    model, _ = llamaherd.load(runs.step_dir(tmp_path, 3))  # a single-file herd checkpoint, one process
    with torch.no_grad():
        logits = model(gathered["tokens"])
    torch.testing.assert_close(logits, gathered["logits"], rtol=1e-5, atol=1e-5)


def test_herd_pretrain_nproc_starts_torchrun_itself(byte_corpus, reference, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "llamaherd", "pretrain", "tiny", "--nproc", "2", *settings(byte_corpus),
           "parallel.pp=2", "--out", str(out), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count(f"step {STEPS}/{STEPS}: train loss") == 1  # rank 0 says it, once
    assert records(out)[0] == pytest.approx(records(reference)[0], rel=1e-5)
    assert json.loads((out / "train_result.json").read_text())["step"] == STEPS


def test_impossible_layouts_are_one_line_errors_before_anything_starts(byte_corpus, tmp_path):
    args = preset("tiny", n_layers=4, n_heads=8, n_kv_heads=2, tie_embeddings=False)
    for world, kw, message in [
        (4, dict(tp=3), "does not divide the world size 4"),
        (4, dict(dp_shard=3), r"dp_shard 3 x tp 1 = 3 processes, but the world size is 4"),
        (8, dict(tp=4), "must divide the model's 2 KV heads"),
        (8, dict(pp=8), "more pipeline stages than the model's 4 layers"),
        (2, dict(pp_schedule="ZeroBubble"), "expected one of 1F1B, Interleaved1F1B, GPipe"),
        (2, dict(dp_shard=0), "expected an integer >= 1, or -1"),
    ]:
        with pytest.raises(HerdError, match=message):
            plan_layout(ParallelConfig(**kw), world, args)
    with pytest.raises(HerdError, match="batch_size 6 .* not a multiple of the 4 data-parallel ranks"):
        plan_layout(ParallelConfig(), 4, args, batch_size=6)
    with pytest.raises(HerdError, match="set model.tie_embeddings=false"):
        plan_layout(ParallelConfig(pp=2), 2, preset("tiny"))
    assert plan_layout(ParallelConfig(pp=2, tp=2), 8, args) == Layout(pp=2, dp_replicate=1, dp_shard=2, tp=2)
    cmd = [sys.executable, "-m", "llamaherd", "pretrain", "tiny", "--nproc", "3", "parallel.tp=2",
           *settings(byte_corpus), "--out", str(tmp_path / "run")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env())
    assert proc.returncode == 2 and "Traceback" not in proc.stderr  # herd's exit status for a usage error
    assert proc.stderr.strip().splitlines() == [
        "error: parallel: pp 1 x dp_replicate 1 x tp 2 = 2 does not divide the world size 3"]
    assert not (tmp_path / "run").exists()  # nothing started


def test_herd_run_passes_nproc_through(tmp_path):
    from llamaherd.train.run import run

    summary = run("tiny", ["data.max_bytes=150000", "tokenizer.vocab_size=300", "model.dim=64", "model.n_layers=2",
                           "model.n_heads=4", "model.n_kv_heads=2", "model.multiple_of=32", "train.steps=4",
                           "train.batch_size=4", "train.seq_len=64", "train.eval_every=4", "train.eval_batches=2",
                           "sample.max_new_tokens=8", "curate.workers=1"], str(tmp_path / "run"), progress=False,
                  nproc=2)
    assert summary.train.step == 4 and summary.train.val_bpb is not None and summary.samples
    assert json.loads((tmp_path / "run" / "train_result.json").read_text())["step"] == 4
    assert "goodput (effective training time)" in (tmp_path / "run" / "report.md").read_text()
