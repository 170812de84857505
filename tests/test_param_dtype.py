"""train.param_dtype=bfloat16, the memory-lean option for one GPU: the weights, their gradients and AdamW's
states in bf16 (8 bytes a parameter instead of 16), RoPE's tables still float32; the model learns, a resumed
run continues exactly, and settings it cannot serve are one-line errors before any work."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from llamaherd.config import load_config
from llamaherd.errors import HerdError
from llamaherd.model.args import num_params
from llamaherd.train.parallel import build_model
from llamaherd.train.pretrain import pretrain
from llamaherd.train.trainer import make_optimizer


def settings(corpus, **extra) -> list[str]:
    base = {"model.dim": 64, "model.n_layers": 2, "model.n_heads": 4, "model.n_kv_heads": 2, "model.multiple_of": 32,
            "data.train_dir": corpus / "train", "data.val_dir": corpus / "val",
            "tokenizer.path": corpus / "tokenizer.model", "train.steps": 12, "train.batch_size": 4,
            "train.seq_len": 64, "train.warmup_steps": 2, "train.log_every": 1, "train.eval_every": 12,
            "train.eval_batches": 1, "train.lr": 0.003, "checkpoint.every": 6, **extra}
    return [f"{k}={v}" for k, v in base.items()]


def records(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_bf16_weights_gradients_and_optimizer_states_take_half_the_memory():
    cfg = load_config("tiny", ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
                               "train.param_dtype=bfloat16"])
    from llamaherd.config import model_args

    args = model_args(cfg, vocab_size=512)
    lean = build_model(args, cfg, torch.device("cpu"))
    cfg.train.param_dtype = "float32"
    full = build_model(args, cfg, torch.device("cpu"))
    assert {p.dtype for p in lean.parameters()} == {torch.bfloat16}
    assert lean.rope_cos.dtype == torch.float32 and torch.equal(lean.rope_cos, full.rope_cos)
    # the same draw of weights, rounded to bf16
    for (name, a), b in zip(lean.named_parameters(), full.parameters(), strict=True):
        assert torch.equal(a, b.to(torch.bfloat16)), name

    def state_bytes(model) -> int:
        opt = make_optimizer(model, cfg.train)
        model(torch.zeros(1, 8, dtype=torch.long)).float().sum().backward()
        opt.step()
        grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        states = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if t.ndim > 0)
        return weights + grads + states

    n = num_params(args)
    assert state_bytes(full) == 16 * n and state_bytes(lean) == 8 * n


@pytest.mark.usefixtures("one_thread")
def test_a_bf16_run_learns_and_resumes_exactly(byte_corpus, tmp_path):
    whole = tmp_path / "whole"
    pretrain(load_config("tiny", settings(byte_corpus, **{"train.param_dtype": "bfloat16"})), whole, progress=False)
    losses = [r["loss"] for r in records(whole) if "loss" in r]
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3  # it learns
    # the run as it stood at its step-6 checkpoint, resumed: the same last 6 losses, bit for bit
    part = tmp_path / "part"
    shutil.copytree(whole, part)
    shutil.rmtree(part / "checkpoints" / "step_0000012")
    pretrain(load_config("tiny", settings(byte_corpus, **{"train.param_dtype": "bfloat16"})), part, progress=False)
    resumed = [r["loss"] for r in records(part) if "loss" in r]
    assert resumed[-6:] == losses[-6:] and json.loads((part / "train_result.json").read_text())["resumed_from"] == 6


def test_bad_param_dtype_is_a_one_line_error_before_any_work(byte_corpus, tmp_path):
    with pytest.raises(HerdError, match=r"train.param_dtype 'float16': expected float32 or bfloat16"):
        pretrain(load_config("tiny", settings(byte_corpus, **{"train.param_dtype": "float16"})), tmp_path / "r",
                 progress=False)
    assert not (tmp_path / "r").exists()
