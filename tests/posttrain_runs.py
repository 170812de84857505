"""What the post-training tests share: `herd` in a process of its own, a run killed with SIGKILL mid-way and
started again, and the comparison of two runs' final checkpoints."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from llamaherd.checkpoint import load, runs

WALL_CLOCK = ("tokens_per_s", "memory_gib", "mfu")  # measurements that differ between two runs


def herd(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "llamaherd", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def logged(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def at_step(step: int):
    """A run has logged training step ``step`` (or later)."""
    def reached(run: Path) -> bool:
        return (run / "metrics.jsonl").is_file() and any(r.get("step", 0) >= step for r in logged(run))
    return reached


def uninterrupted_and_killed(args: list[str], ref: Path, run: Path, kill_after: int, steps: int,
                             kill_when=None, finished=None) -> None:
    """`herd *args --out ref` to its end; `herd *args --out run` SIGKILLed once it has logged step
    ``kill_after`` (or once ``kill_when(run)``) and checked not to have logged step ``steps`` (or not to be
    ``finished(run)``), then run again to its end."""
    kill_when, finished = kill_when or at_step(kill_after), finished or at_step(steps)
    proc = herd(*args, "--out", str(ref))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    proc = herd(*args, "--out", str(run))
    deadline = time.time() + 120
    while not kill_when(run):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() is not None else ""
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not finished(run), "the run finished before it was killed"
    proc = herd(*args, "--out", str(run))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err


def assert_same_run(a: Path, b: Path, steps: int, state_keys: tuple[str, ...] = ()) -> None:
    """The newest checkpoints of runs ``a`` and ``b`` are both step ``steps`` and equal bit for bit: weights,
    the train state's ``state_keys`` (tensors or dicts of tensors), optimizer moments; and so is every
    logged number but the wall-clock ones."""
    ca, cb = runs.latest_good(a), runs.latest_good(b)
    assert ca.name == cb.name == f"step_{steps:07d}"
    wa, wb = load(ca)[0].state_dict(), load(cb)[0].state_dict()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"weight {k} differs"
    sa, sb = runs.load_train_state(ca), runs.load_train_state(cb)
    for key in state_keys:
        va, vb = sa[key], sb[key]
        for k in (va if isinstance(va, dict) else [None]):
            x, y = (va, vb) if k is None else (va[k], vb[k])
            assert torch.equal(x, y), f"{key} {k or ''} differs"
    opt_a, opt_b = sa["optimizer"]["state"], sb["optimizer"]["state"]
    assert opt_a.keys() == opt_b.keys()
    for i in opt_a:
        for k in opt_a[i]:
            assert torch.equal(opt_a[i][k], opt_b[i][k]), f"optimizer state {i}.{k} differs"
    rec_a = [{k: v for k, v in r.items() if k not in WALL_CLOCK} for r in logged(a) if r.get("event") != "goodput"]
    rec_b = [{k: v for k, v in r.items() if k not in WALL_CLOCK} for r in logged(b) if r.get("event") != "goodput"]
    assert rec_a == rec_b


def save_byte_base(path: Path, max_seq_len: int) -> Path:
    """A small random base model (dim 64, 2 layers) with a byte-level tokenizer, which has the Llama 3 chat
    special tokens, saved at ``path``."""
    from llamaherd.checkpoint import save
    from llamaherd.model.args import preset
    from llamaherd.model.transformer import Transformer
    from llamaherd.tokenizer import Tokenizer

    tok = Tokenizer.from_ranks({bytes([i]): i for i in range(256)})
    args = preset("tiny", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.n_words, multiple_of=32,
                  max_seq_len=max_seq_len)
    model = Transformer(args)
    model.init_rope()
    model.init_weights(std=0.02, seed=0)
    save(model, path, layout="herd", tokenizer=tok)
    return path
