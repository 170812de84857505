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
    total: torch.Tensor | None = None  # the sum over the units, when the loss can say (see below)


# A loss that also has ``units(batch)`` (how many units a batch holds, known before the model runs) and
# returns ``total`` is normalised by the units of the whole step: every micro-batch and every data-parallel
# rank together, so that a recipe trains the same model at any world size and gradient accumulation.


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy in nats over the targets that are not ignored (-100): their mean, or sum."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction=reduction)


class NextTokenLoss:
    """Predict every next token of packed rows (``inputs``, ``targets``, ``doc_ids``; see data/loader.py):
    attention stays inside each document and RoPE positions restart at each one.

    ``compile`` compiles the cross-entropy, which fuses the float32 upcast of the logits into it.
    """

    def __init__(self, compile: bool = False):
        self.cross_entropy = torch.compile(cross_entropy) if compile else cross_entropy

    def __call__(self, model, batch) -> LossOutput:
        logits = model(batch.inputs, doc_positions(batch.doc_ids), mask=doc_mask(batch.doc_ids))
        count = self.units(batch)
        total = self.cross_entropy(logits, batch.targets, "sum")
        return LossOutput(total / count.clamp(min=1), count, total=total)

    @staticmethod
    def units(batch) -> torch.Tensor:
        """The targets a batch holds: its tokens that are not ignored."""
        return (batch.targets != IGNORE_INDEX).sum()
