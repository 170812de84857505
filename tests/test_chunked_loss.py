"""The chunked head + cross-entropy (``train.loss_chunk``): the loss and gradients of the plain path over the
real 128K vocabulary, a float64 gradcheck, the same training run with and without it (alone and under FSDP),
and what it keeps for backward: a float per token instead of the [tokens, vocab] float32 logits.

Tolerances: float32 sums in other orders, so loss and gradients agree to 1e-5 relative (measured: below
1e-6); training losses after a few AdamW steps to 1e-5 relative (measured: equal to about 1e-7).
"""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from llamaherd.config import load_config
from llamaherd.errors import HerdError
from llamaherd.train.losses import NextTokenLoss, chunked_cross_entropy, cross_entropy
from llamaherd.train.pretrain import pretrain

VOCAB = 128_256  # Llama 3's


def problem(tokens=300, dim=64, vocab=VOCAB, seed=0, dtype=torch.float32, shape=None):
    """Hidden states, a head weight and targets (every 7th ignored), as leaves that want gradients."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, dim, generator=g, dtype=dtype)
    weight = torch.randn(vocab, dim, generator=g, dtype=dtype) * 0.1
    targets = torch.randint(0, vocab, (tokens,), generator=g)
    targets[::7] = -100
    if shape is not None:
        hidden, targets = hidden.view(*shape, dim), targets.view(shape)
    return hidden.requires_grad_(), weight.requires_grad_(), targets


def assert_close_rel(a: torch.Tensor, b: torch.Tensor, rel: float) -> None:
    """Equal to ``rel`` relative to the size of ``b``: as a whole (norm) and element by element (max)."""
    assert float((a - b).norm() / b.norm()) <= rel
    torch.testing.assert_close(a, b, rtol=rel, atol=rel * float(b.abs().max()))


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("chunk", [64, 100, 1000])  # does not divide 300 tokens, divides them, one chunk for all
def test_same_loss_and_gradients_as_the_full_logits_over_the_128k_vocabulary(reduction, chunk):
    hidden, weight, targets = problem(shape=(3, 100))
    ours = chunked_cross_entropy(hidden, weight, targets, chunk_size=chunk, reduction=reduction)
    grads = torch.autograd.grad(ours, (hidden, weight))
    logits = hidden @ weight.t()  # [3, 100, 128256]
    ref = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction=reduction)
    ref_grads = torch.autograd.grad(ref, (hidden, weight))
    assert ours.dtype == torch.float32 and ours.shape == ()
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    for a, b in zip(grads, ref_grads):
        assert a.shape == b.shape
        assert_close_rel(a, b, 1e-5)


def test_float64_gradcheck():
    hidden, weight, targets = problem(tokens=7, dim=4, vocab=11, dtype=torch.float64)
    for reduction in ("sum", "mean"):
        assert torch.autograd.gradcheck(
            lambda h, w, reduction=reduction: chunked_cross_entropy(h, w, targets, 3, reduction), (hidden, weight))


def test_ignored_targets_count_for_nothing():
    hidden, weight, targets = problem(tokens=20, dim=8, vocab=50)
    keep = targets != -100
    full = chunked_cross_entropy(hidden, weight, targets, 6, "sum")
    kept = chunked_cross_entropy(hidden[keep], weight, targets[keep], 6, "sum")
    assert full.item() == pytest.approx(kept.item(), rel=1e-6)
    (grad,) = torch.autograd.grad(full, hidden)
    assert torch.count_nonzero(grad[~keep]) == 0 and torch.count_nonzero(grad[keep]) > 0
    none = torch.full_like(targets, -100)
    assert chunked_cross_entropy(hidden, weight, none, 6, "sum").item() == 0.0
    assert torch.isnan(chunked_cross_entropy(hidden, weight, none, 6, "mean"))  # as F.cross_entropy says


def test_a_frozen_head_gets_no_gradient_and_hidden_still_does():
    hidden, weight, targets = problem(tokens=30, dim=8, vocab=40)
    weight.requires_grad_(False)
    chunked_cross_entropy(hidden, weight, targets, 8).backward()
    ref = hidden.detach().clone().requires_grad_()
    cross_entropy((ref @ weight.t())[None], targets[None], "sum").backward()
    assert weight.grad is None
    assert_close_rel(hidden.grad, ref.grad, 1e-5)


def test_bf16_autocast_computes_the_logits_in_bf16_as_the_plain_head_does():
    """Under autocast the logits are bf16, as the plain head's: the same loss and hidden gradient; the weight's
    gradient is summed over chunks in float32, which lands at least as near the float64 truth as the plain
    head's one bf16 product over every token."""
    hidden, weight, targets = problem(tokens=256, dim=64, vocab=5000)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = chunked_cross_entropy(hidden, weight, targets, 100, "mean")
        ref = cross_entropy((hidden @ weight.t())[None], targets[None], "mean")
    grads, ref_grads = torch.autograd.grad(ours, (hidden, weight)), torch.autograd.grad(ref, (hidden, weight))
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
    assert_close_rel(grads[0], ref_grads[0], 1e-5)
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    exact = torch.autograd.grad(cross_entropy((h64 @ w64.t())[None], targets[None], "mean"), w64)[0]
    assert (grads[1] - exact).norm() <= (ref_grads[1] - exact).norm()
    assert float((grads[1] - exact).norm() / exact.norm()) < 1e-2  # bf16 logits: about 3 significant digits


def saved_bytes(fn) -> tuple[int, list[torch.Tensor]]:
    """Bytes of the tensors autograd keeps for backward while ``fn()`` runs, each storage counted once."""
    seen, tensors = set(), []

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            tensors.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(t.untyped_storage().nbytes() for t in tensors), tensors


def test_saves_a_float_per_token_not_the_float32_logits():
    hidden, weight, targets = problem(tokens=300, dim=64)
    inputs = {hidden.untyped_storage().data_ptr(), weight.untyped_storage().data_ptr()}

    def beyond_inputs(fn):  # what is kept besides the hidden states and the weight, which both paths keep
        _, tensors = saved_bytes(fn)
        return sum(t.untyped_storage().nbytes() for t in tensors if t.untyped_storage().data_ptr() not in inputs)

    plain = beyond_inputs(lambda: cross_entropy((hidden @ weight.t())[None], targets[None], "sum"))
    chunked = beyond_inputs(lambda: chunked_cross_entropy(hidden, weight, targets, 64, "sum"))
    logits_f32 = 300 * VOCAB * 4  # 154 MB
    assert plain >= logits_f32
    assert chunked <= 300 * (4 + 8)  # the float32 logsumexp and the int64 targets of each token: 3.6 KB


def test_next_token_loss_refuses_a_negative_chunk():
    with pytest.raises(HerdError, match=r"train.loss_chunk -1"):
        NextTokenLoss(chunk_size=-1)
    with pytest.raises(HerdError, match="chunk_size 0"):
        chunked_cross_entropy(*problem(tokens=4, dim=2, vocab=3), chunk_size=0)


def settings(corpus, **extra) -> list[str]:
    base = {"model.dim": 64, "model.n_layers": 2, "model.n_heads": 4, "model.n_kv_heads": 2, "model.multiple_of": 32,
            "model.tie_embeddings": "true", "data.train_dir": corpus / "train", "data.val_dir": corpus / "val",
            "tokenizer.path": corpus / "tokenizer.model", "train.steps": 3, "train.batch_size": 4,
            "train.seq_len": 64, "train.warmup_steps": 1, "train.log_every": 1, "train.eval_every": 3,
            "train.eval_batches": 1, "train.lr": 0.003, "checkpoint.every": 3, **extra}
    return [f"{k}={v}" for k, v in base.items()]


def losses(run) -> tuple[list[float], list[float]]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r], [r["val_loss"] for r in records if "val_loss" in r]


@pytest.fixture(scope="module")
def plain_run(byte_corpus, tmp_path_factory):
    """Three steps of a tied-embedding model with the plain loss."""
    out = tmp_path_factory.mktemp("plain") / "run"
    pretrain(load_config("tiny", settings(byte_corpus)), out, progress=False)
    return out


@pytest.mark.usefixtures("one_thread")
def test_training_with_train_loss_chunk_gives_the_same_losses(byte_corpus, plain_run, tmp_path, monkeypatch):
    from llamaherd.train import losses as losses_module

    calls = []

    def spy(hidden, weight, targets, chunk_size, reduction):
        calls.append((tuple(hidden.shape), chunk_size))
        return chunked_cross_entropy(hidden, weight, targets, chunk_size, reduction)

    monkeypatch.setattr(losses_module, "chunked_cross_entropy", spy)
    # 4 x 64 = 256 tokens a micro-batch, 100 a chunk: two whole chunks and a short one
    pretrain(load_config("tiny", settings(byte_corpus, **{"train.loss_chunk": 100})), tmp_path / "run", progress=False)
    (ours, ours_val), (ref, ref_val) = losses(tmp_path / "run"), losses(plain_run)
    assert len(ours) == 3 and len(ours_val) == 1
    # every step's micro-batch and the validation batch went through it, as hidden states (dim 64)
    assert len(calls) == 4 and all(shape[-1] == 64 and chunk == 100 for shape, chunk in calls)
    assert ours == pytest.approx(ref, rel=1e-5) and ours_val == pytest.approx(ref_val, rel=1e-5)


@pytest.mark.slow
def test_fsdp_with_train_loss_chunk_trains_the_model_one_plain_process_trains(byte_corpus, plain_run, tmp_path):
    """Under FSDP the root's parameters (the tied head's among them) stay gathered from the forward to the end
    of the backward, so the chunked loss reads the whole weight and its gradient is reduce-scattered."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "llamaherd",
           "pretrain", "tiny", *settings(byte_corpus, **{"train.loss_chunk": 100}), "--out", str(out), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stderr[-8000:]
    (ours, ours_val), (ref, ref_val) = losses(out), losses(plain_run)
    assert len(ours) == 3 and ours == pytest.approx(ref, rel=1e-5) and ours_val == pytest.approx(ref_val, rel=1e-5)


@pytest.mark.parametrize("layout", ["parallel.tp=2", "parallel.pp=2"])
def test_tensor_or_pipeline_parallel_with_train_loss_chunk_is_a_one_line_error(layout, tmp_path):
    cfg = load_config("tiny", ["train.loss_chunk=256", layout])
    with pytest.raises(HerdError, match=r"train.loss_chunk 256 with parallel.tp \d and parallel.pp \d"):
        pretrain(cfg, tmp_path / "run", progress=False)
