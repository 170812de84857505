"""How a model is built for training, and everything the model itself does not know, applied from outside.

    model = build_model(args, cfg, device)   # meta device -> parallelize -> materialise -> fresh weights

``parallelize`` applies, in this order: tensor parallel -> activation checkpointing -> compile ->
FSDP (the middle two so far; the parallelisms plug in here). It runs on the model while it is still
on the meta device and holds no memory, as torchtitan does, so a model too large for one device can
be sharded before any weight exists.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint

from llamaherd.config import RunConfig
from llamaherd.model.args import ModelArgs
from llamaherd.model.transformer import Transformer


def apply_activation_checkpointing(model) -> None:
    """Recompute each transformer block's activations in the backward pass instead of storing them.

    The blocks' forward methods are wrapped in place, so parameter names (and checkpoints) are unchanged.
    """
    for block in model.layers:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def apply_compile(model) -> None:
    """Compile each block separately: the blocks are identical, so one compiled graph serves them all."""
    for block in model.layers:
        block.compile()


def parallelize(model: Transformer, cfg: RunConfig) -> Transformer:
    """Apply to ``model``, in place, what ``cfg`` asks for (``train.activation_checkpointing``,
    ``train.compile``); returns it."""
    if cfg.train.activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.train.compile:
        apply_compile(model)
    return model


def build_model(args: ModelArgs, cfg: RunConfig, device: torch.device) -> Transformer:
    """A model to train: built on the meta device, parallelised, materialised on ``device`` with fresh
    weights drawn from ``cfg.train.seed`` (a resumed run then loads its checkpoint into it)."""
    torch.manual_seed(cfg.train.seed)
    with torch.device("meta"):
        model = Transformer(args)
    parallelize(model, cfg)
    model.to_empty(device=device)
    if args.tie_embeddings:  # to_empty gives every module its own tensor: tie them again
        model.output.weight = model.tok_embeddings.weight
    model.init_rope(device)
    model.init_weights(seed=cfg.train.seed)
    return model.train()
