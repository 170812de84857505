"""Everything the model itself does not know: applied from outside, in the order
tensor parallel -> activation checkpointing -> compile -> FSDP (only the middle two so far)."""

from __future__ import annotations

import functools

from torch.utils.checkpoint import checkpoint


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


def prepare_model(model, *, activation_checkpointing: bool = False, compile: bool = False) -> None:
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile:
        apply_compile(model)
