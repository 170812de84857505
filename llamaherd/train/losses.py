"""Losses the Trainer minimises: a loss is any callable ``loss(model, batch) -> LossOutput``.

It runs the model on the batch itself (a preference loss runs it twice, or a reference model too)
and says how many units its mean is over, so that evaluation can weight batches fairly:

    next-token cross-entropy   pretraining, SFT (prompt tokens masked with -100)    here
    preference losses          DPO, the reward model                                posttrain/, next
    PPO's clipped objectives   PPO                                                  posttrain/, later

The next-token loss can also run chunked (``train.loss_chunk``): ``chunked_cross_entropy`` takes the final
hidden states and the output weight and never holds the [tokens, vocab] logits (nor their float32 copy)
at once, only one chunk of rows at a time, in the forward and in the backward pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from llamaherd.data.loader import IGNORE_INDEX
from llamaherd.errors import HerdError
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


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T`` over rows (tokens), ``chunk`` rows at a time.

    Forward keeps, per token, only the float32 logsumexp of its logits; backward recomputes each chunk's
    logits from ``hidden`` and ``weight`` (which a plain head saves anyway) and turns them into
    softmax - onehot there and then. So one chunk of [chunk, vocab] logits exists at a time, never all
    of them. The logits are computed in ``dtype`` (what the plain head computes them in: the autocast dtype
    under autocast), their softmax in float32 (float64 for float64 inputs), as ``cross_entropy`` does.

    Recomputing costs one more chunk-by-vocabulary product in backward (the head's matmuls go from 3 to 4)
    but keeps forward a pure function: evaluation under ``no_grad`` does only the loss, and nothing the
    size of the weight's gradient is held between forward and backward, as computing the gradients inside
    forward (Liger's way) would need.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int, dtype: torch.dtype):
        acc = torch.promote_types(dtype, torch.float32)  # float32, or float64 for float64 inputs
        valid = targets != IGNORE_INDEX
        safe = torch.where(valid, targets, 0)  # a real index for the gather; ignored rows count for nothing
        w = weight.to(dtype)
        lse = torch.empty(hidden.shape[0], dtype=acc, device=hidden.device)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):  # the dtype is chosen above, not by autocast
            for i in range(0, hidden.shape[0], chunk):
                logits = (hidden[i:i + chunk].to(dtype) @ w.t()).to(acc)
                lse[i:i + chunk] = torch.logsumexp(logits, dim=-1)
                picked = logits.gather(1, safe[i:i + chunk, None]).squeeze(1)
                total += torch.where(valid[i:i + chunk], lse[i:i + chunk] - picked, 0).sum()
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk, ctx.dtype = chunk, dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        hidden, weight, targets, lse = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        if not (need_hidden or need_weight):
            return None, None, None, None, None
        chunk, dtype = ctx.chunk, ctx.dtype
        valid = targets != IGNORE_INDEX
        safe = torch.where(valid, targets, 0)
        w = weight.to(dtype)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device) if need_weight else None
        with torch.autocast(hidden.device.type, enabled=False):
            for i in range(0, hidden.shape[0], chunk):
                h = hidden[i:i + chunk].to(dtype)
                probs = ((h @ w.t()).to(lse.dtype) - lse[i:i + chunk, None]).exp_()  # softmax, from the saved lse
                rows = torch.arange(probs.shape[0], device=probs.device)
                probs[rows, safe[i:i + chunk]] -= 1  # softmax - onehot
                scale = torch.where(valid[i:i + chunk], grad_total, 0)  # ignored rows: no gradient
                grad_logits = probs.mul_(scale[:, None]).to(dtype)
                if need_hidden:
                    grad_hidden[i:i + chunk] = grad_logits @ w
                if need_weight:
                    grad_weight += (grad_logits.t() @ h).to(grad_weight.dtype)
        if need_weight:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int = 1024,
                          reduction: str = "sum") -> torch.Tensor:
    """Next-token cross-entropy in nats of the logits ``hidden @ weight.T``, ``chunk_size`` tokens at a time:
    the same number as ``cross_entropy(hidden @ weight.T, targets, reduction)``, with its gradients for
    ``hidden`` and ``weight``, without ever holding all the logits.

    hidden [..., dim] (e.g. the model's final normed hidden states, ``model(..., head=False)``), weight
    [vocab, dim] (the head's, ``model.output.weight``), targets [...] with -100 where nothing is predicted.
    ``reduction``: "sum", or "mean" over the targets that are not ignored (NaN when all are, as in
    ``F.cross_entropy``). Memory beyond the inputs: one chunk's logits and their float32 copy,
    chunk_size x vocab x (2 + 4) bytes in bf16 (1024 x 128,256: 0.8 GB), and a float32 per token.
    """
    if chunk_size < 1:
        raise HerdError(f"chunked_cross_entropy: chunk_size {chunk_size}; expected a number of tokens >= 1")
    if reduction not in ("sum", "mean"):
        raise HerdError(f"chunked_cross_entropy: reduction {reduction!r}; expected 'sum' or 'mean'")
    if hidden.shape[-1] != weight.shape[-1] or hidden.shape[:-1] != targets.shape:
        raise HerdError(f"chunked_cross_entropy: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)} and "
                        f"targets {tuple(targets.shape)}; expected [..., dim], [vocab, dim] and [...]")
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    flat = targets.reshape(-1)
    total = _ChunkedCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, flat, chunk_size, dtype)
    if reduction == "mean":
        return total / (flat != IGNORE_INDEX).sum()
    return total


class NextTokenLoss:
    """Predict every next token of packed rows (``inputs``, ``targets``, ``doc_ids``; see data/loader.py):
    attention stays inside each document and RoPE positions restart at each one.

    ``compile`` compiles the cross-entropy, which fuses the float32 upcast of the logits into it.
    ``chunk_size`` > 0 (``train.loss_chunk``) runs the model without its head and computes head and loss
    together, that many tokens at a time (``chunked_cross_entropy``): the same loss and gradients, and no
    [tokens, vocab] logits in memory. It needs the head's whole weight where the loss runs: a plain model,
    or FSDP (whose root parameters, the head's among them, stay gathered from the forward to the end of the
    backward); not tensor parallel (the weight split by vocabulary rows: loss parallel covers that) nor
    pipeline stages (the last stage computes its own loss). ``compile`` applies to the plain loss only.
    """

    def __init__(self, compile: bool = False, chunk_size: int = 0):
        if chunk_size < 0:
            raise HerdError(f"train.loss_chunk {chunk_size}: expected 0 (the plain loss) or tokens per chunk >= 1")
        self.chunk_size = chunk_size
        self.cross_entropy = torch.compile(cross_entropy) if compile and not chunk_size else cross_entropy

    def __call__(self, model, batch) -> LossOutput:
        positions, mask = doc_positions(batch.doc_ids), doc_mask(batch.doc_ids)
        count = self.units(batch)
        if self.chunk_size:
            hidden = model(batch.inputs, positions, mask=mask, head=False)
            weight = model.output.weight
            if _is_dtensor(weight) or _is_dtensor(hidden):
                raise HerdError("train.loss_chunk: the output weight is split over devices (tensor parallel); "
                                "expected train.loss_chunk=0, where loss parallel keeps the logits split instead")
            total = chunked_cross_entropy(hidden, weight, batch.targets, self.chunk_size, "sum")
        else:
            logits = model(batch.inputs, positions, mask=mask)
            total = self.cross_entropy(logits, batch.targets, "sum")
        return LossOutput(total / count.clamp(min=1), count, total=total)

    @staticmethod
    def units(batch) -> torch.Tensor:
        """The targets a batch holds: its tokens that are not ignored."""
        return (batch.targets != IGNORE_INDEX).sum()


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)
