"""Checkpoint averaging: the element-wise mean of several checkpoints of one model shape (Meta averaged the
models of several runs, or data versions, of each post-training stage).

    average(["runs/a/sft", "runs/b/sft"], "runs/avg")     # or: herd average CKPT CKPT ... --out DIR

The checkpoints may be in any layout (each is read as ``llamaherd.load`` reads it); the mean is taken in
float32 and written in the herd layout in the first checkpoint's dtype, with its tokenizer.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from llamaherd.errors import HerdError


def average(paths: list[str | os.PathLike], out: str | os.PathLike, *, weights: list[float] | None = None,
            overwrite: bool = False) -> Path:
    """Write the (``weights``-weighted, default equal) mean of the checkpoints ``paths`` to ``out``."""
    from llamaherd.checkpoint import load, save

    if len(paths) < 2:
        raise HerdError(f"averaging needs two checkpoints or more, got {len(paths)}")
    weights = [1.0] * len(paths) if weights is None else list(weights)
    if len(weights) != len(paths) or sum(weights) <= 0 or min(weights) < 0:
        raise HerdError("weights: expected one non-negative number per checkpoint, not all 0")
    first, tokenizer = load(paths[0], device="cpu")
    dtype = first.tok_embeddings.weight.dtype
    total = {k: v.float() * weights[0] for k, v in first.state_dict().items()}
    for path, w in zip(paths[1:], weights[1:], strict=True):
        model, _ = load(path, device="cpu", tokenizer=False)
        state = model.state_dict()
        if {k: v.shape for k, v in state.items()} != {k: v.shape for k, v in total.items()}:
            raise HerdError(f"{path}: a different model shape than {paths[0]} ({_diff(first.args, model.args)}); "
                            "only checkpoints of one shape can be averaged")
        for k, v in state.items():
            total[k] += v.float() * w
    norm = sum(weights)
    with torch.no_grad():
        first.load_state_dict({k: (v / norm).to(dtype) for k, v in total.items()})
    return save(first, out, layout="herd", tokenizer=tokenizer, overwrite=overwrite)


def _diff(a, b) -> str:
    from dataclasses import fields

    return ", ".join(f"{f.name} {getattr(a, f.name)} vs {getattr(b, f.name)}" for f in fields(a)
                     if getattr(a, f.name) != getattr(b, f.name))
