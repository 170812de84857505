"""Losses the Trainer minimises: a loss is any callable ``loss(model, batch) -> LossOutput``.

It runs the model on the batch itself (a preference loss runs it twice, or a reference model too)
and says how many units its mean is over, so that evaluation can weight batches fairly:

    next-token cross-entropy   pretraining, SFT (prompt tokens masked with -100)    here
    preference losses          DPO, the reward model                                posttrain/, next
    PPO's clipped objectives   PPO                                                  posttrain/, later
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from llamaherd.data.loader import IGNORE_INDEX
from llamaherd.model.masks import doc_mask, doc_positions


@dataclass
class LossOutput:
    loss: torch.Tensor  # the scalar to minimise: a mean over `count` units
    count: torch.Tensor | int  # how many units (predicted tokens, preference pairs) the mean is over
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # more scalars to log, each also a mean


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in nats over the targets that are not ignored (-100)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)


class NextTokenLoss:
    """Predict every next token of packed rows (``inputs``, ``targets``, ``doc_ids``; see data/loader.py):
    attention stays inside each document and RoPE positions restart at each one.

    ``compile`` compiles the cross-entropy, which fuses the float32 upcast of the logits into it.
    """

    def __init__(self, compile: bool = False):
        self.cross_entropy = torch.compile(cross_entropy) if compile else cross_entropy

    def __call__(self, model, batch) -> LossOutput:
        logits = model(batch.inputs, doc_positions(batch.doc_ids), mask=doc_mask(batch.doc_ids))
        return LossOutput(self.cross_entropy(logits, batch.targets), (batch.targets != IGNORE_INDEX).sum())
