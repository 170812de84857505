"""The static KV cache that generation builds, owns and hands to the model.

    cache = StaticKVCache(model.args, batch=2, length=256)
    logits = model(tokens, positions, mask=causal_mask(positions, n), cache=cache)   # prefill or decode

Per layer, keys and values are kept as [batch, n_kv_heads, length, head_dim]: only the KV heads,
never repeated for each query head. ``positions`` may differ per row (rows of a batch at different
lengths, as a serving engine has them). The cache also decides how attention over it is computed:
the model's own SDPA, or another function for one new token per row (``decode_attention``), which
is how the ahead-of-time compiled CPU decode step gets attention as two plain products.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from llamaherd.model.args import ModelArgs
from llamaherd.model.masks import causal_mask
from llamaherd.model.transformer import attention


def grouped_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None):
    """Attention of one new token per row over the KV cache, as two products.

    q [B, H, 1, D]; k, v [B, H_kv, T, D]; mask boolean, broadcastable to [B, 1, 1, T]. Each KV head
    serves its group of H / H_kv query heads (head i uses KV head i // group, as SDPA's ``enable_gqa``)
    without being repeated. Compiled (the ahead-of-time CPU decode step) this costs less than the fused
    SDPA kernel, whose per-call setup outweighs one query's work; run eagerly, SDPA's single call is
    cheaper (docs/benchmarks.md).
    """
    b, h, _, d = q.shape
    groups = q.view(b, k.shape[1], h // k.shape[1], d)  # [B, H_kv, group, D]
    scores = (groups @ k.transpose(-1, -2)).float() * d**-0.5  # [B, H_kv, group, T]
    if mask is not None:
        scores = scores.masked_fill(~mask.view(mask.shape[0], 1, 1, -1), float("-inf"))
    return (torch.softmax(scores, dim=-1).type_as(q) @ v).view(b, h, 1, d)


class _LayerKV(nn.Module):
    def __init__(self, shape: tuple[int, ...], dtype, device):
        super().__init__()
        with torch.inference_mode(False):  # normal tensors, which an exported decode step can update
            self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
            self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def write(self, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        if positions.dim() == 1:  # every row at the same positions
            self.k.index_copy_(2, positions, k)
            self.v.index_copy_(2, positions, v)
        else:  # row b's token s goes to slot positions[b, s]
            rows = torch.arange(k.shape[0], device=k.device)[:, None]
            self.k[rows, :, positions] = k.transpose(1, 2)
            self.v[rows, :, positions] = v.transpose(1, 2)


class StaticKVCache(nn.Module):
    """Keys and values of ``batch`` rows of up to ``length`` positions, for every layer of a model.

    ``decode_attention(q, k, v, mask)``, when given, computes attention for calls with one new token per
    row (decode steps); other calls (prefill) and the default use the model's SDPA ``attention``.
    """

    def __init__(self, args: ModelArgs, batch: int, length: int, dtype=torch.float32, device=None,
                 decode_attention: Callable | None = None):
        super().__init__()
        self.batch, self.length = batch, length
        shape = (batch, args.n_kv_heads, length, args.head_dim)
        self.layers = nn.ModuleList(_LayerKV(shape, dtype, device) for _ in range(args.n_layers))
        self.decode_attention = decode_attention

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
               mask: torch.Tensor | None) -> torch.Tensor:
        """Write k, v at ``positions``, then attend over the cache. ``mask`` says over what:

        - a boolean [B or 1, 1, S, K] tensor (``causal_mask(positions, K)``): the first K positions, masked;
        - a 1-D tensor of length K (its values unused): all of the first K positions, unmasked, which is
          what decoding rows at one shared position K - 1 needs; its length may be a symbolic size when
          exported, and no mask is applied (a mask costs a compiled one-token step ~10%);
        - None: the whole cache, causally by position (static shapes, as CUDA graphs need).
        """
        kv = self.layers[layer]
        kv.write(positions, k, v)
        if mask is None:
            keys, values, mask = kv.k, kv.v, causal_mask(positions, self.length)
        else:
            keys, values = kv.k[:, :, : mask.shape[-1]], kv.v[:, :, : mask.shape[-1]]
            if mask.dim() == 1:
                mask = None
        if self.decode_attention is not None and q.shape[2] == 1:
            return self.decode_attention(q, keys, values, mask)
        return attention(q, keys, values, mask, causal=False)

    def matches(self, batch: int, length: int, dtype, device) -> bool:
        k = self.layers[0].k
        return (self.batch, self.length, k.dtype, k.device) == (batch, length, dtype, torch.device(device))

    @torch.no_grad()
    def reset(self) -> None:
        """Zero every slot, keeping the tensors (and their addresses: a captured CUDA graph stays valid)."""
        for kv in self.layers:
            kv.k.zero_()
            kv.v.zero_()
