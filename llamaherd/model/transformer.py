"""The Llama 3 transformer, as in Meta's reference: parameter names match Meta's checkpoints.

tokens -> tok_embeddings -> n_layers x [x + attention(attention_norm(x)); x + feed_forward(ffn_norm(x))]
       -> norm -> output -> logits

The model knows nothing of parallelism or compilation; those are applied from outside. Masks and the
KV cache come from the caller too, so training, prefill and decoding are one forward pass.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from llamaherd.model.args import ModelArgs


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_frequencies(args: ModelArgs, device=None) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/d), with Llama 3.1's smooth scaling of the low frequencies."""
    dim = args.head_dim
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.int64).float() / dim))
    if not args.use_scaled_rope:
        return freqs
    factor, low, high, old_ctx = (args.rope_scaling_factor, args.rope_low_freq_factor,
                                  args.rope_high_freq_factor, args.rope_original_context)
    low_freq_wavelen, high_freq_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / freqs
    scaled = torch.where(wavelen > low_freq_wavelen, freqs / factor, freqs)  # long wavelengths: interpolate
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_table(args: ModelArgs, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, [max_seq_len, head_dim // 2] in float32."""
    freqs = rope_frequencies(args, device)
    t = torch.arange(args.max_seq_len, device=device, dtype=torch.int64).float()
    angles = torch.outer(t, freqs)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (x[2i], x[2i+1]) of x [B, S, H, D] (Meta's interleaved layout).

    cos/sin are [S, D/2] (shared positions) or [B, S, D/2] (per-row positions).
    """
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


class KVCache(Protocol):
    """What ``Transformer.forward`` needs of a KV cache: the caller builds it, owns it and passes it in.

    ``attend`` stores layer ``layer``'s new keys and values (k, v [B, H_kv, S, D]) at ``positions``
    ([S] or [B, S]) and returns the attention of the queries q [B, H, S, D] over what the cache holds
    under ``mask`` ([B or 1, 1, S, K] boolean, or None; see ``Transformer.forward``): [B, H, S, D].
    The cache chooses how attention is computed (a static cache, a paged one, a kernel for decoding);
    ``llamaherd.generation.StaticKVCache`` is the one generation uses.
    """

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
               mask: torch.Tensor | None) -> torch.Tensor: ...


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None, causal: bool = True) -> torch.Tensor:
    """Scaled dot-product attention with grouped KV heads: q [B, H, S, D], k/v [B, H_kv, T, D] -> [B, H, S, D].

    ``mask``: a boolean tensor broadcastable to [B, H, S, T] (True: may attend); a FlexAttention
    ``BlockMask`` (packed documents on CUDA); or None: causal (S == T), or with ``causal=False``
    every query sees every key.
    """
    gqa = q.shape[1] != k.shape[1]
    if mask is not None and not isinstance(mask, torch.Tensor):  # a FlexAttention BlockMask
        return _flex_attention(q.is_cuda)(q, k, v, block_mask=mask, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                          enable_gqa=gqa)


def _flex_attention(compiled: bool):
    """FlexAttention, compiled into a fused kernel on GPUs (eager elsewhere: correct, not fast)."""
    from torch.nn.attention.flex_attention import flex_attention

    global _FLEX
    if not compiled:
        return flex_attention
    if _FLEX is None:
        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


_FLEX = None


class Attention(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)

    def forward(self, x, cos, sin, positions, mask=None, cache: KVCache | None = None):
        bsz, seqlen, _ = x.shape
        # heads from the projections' width: a tensor-parallel rank holds only its share of them
        q = self.wq(x).view(bsz, seqlen, -1, self.head_dim)
        k = self.wk(x).view(bsz, seqlen, -1, self.head_dim)
        v = self.wv(x).view(bsz, seqlen, -1, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, S, D]
        if cache is None:
            out = attention(q, k, v, mask)
        else:
            out = cache.attend(self.layer_id, q, k, v, positions, mask)
        return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(layer_id, args)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, positions, mask=None, cache: KVCache | None = None):
        h = x + self.attention(self.attention_norm(x), cos, sin, positions, mask, cache)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(i, args) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rope_table(args, device=self.tok_embeddings.weight.device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None, *, mask=None,
                cache: KVCache | None = None, last_only: bool = False, head: bool = True) -> torch.Tensor:
        """tokens [B, S] -> logits [B, S, vocab] (or [B, 1, vocab], the last position only, with ``last_only``;
        or without ``head`` the final normed hidden states [B, S, dim], for a head of the caller's own, e.g. a
        reward model's).

        One signature for training, prefill and decoding, which differ only in what they pass:

        positions: [S] (shared by every row) or [B, S] (one per row, e.g. rows of a batch at different
            lengths): each token's RoPE position and, with a cache, the cache slot it is written to.
            Default 0..S-1. Packed training rows restart them at each document (``masks.doc_positions``).
        mask: who may attend to whom, built by the caller (``llamaherd.model.masks``). Without a cache:
            None is causal over the S tokens; a boolean [B or 1, 1, S, S] tensor (True: may attend) or a
            FlexAttention BlockMask (``doc_mask``) keeps packed documents apart. With a cache, the mask
            is the cache's to read; ``StaticKVCache`` takes a boolean [B or 1, 1, S, K] tensor over the
            first K cache positions (``causal_mask(positions, K)``), a 1-D tensor of length K when every
            new token sees all of the first K positions (decoding rows at one shared position), or None
            for causal by position over the whole cache (static shapes, for CUDA graphs).
        cache: the caller's KV cache (``KVCache``): every layer writes its keys and values at
            ``positions`` and attends over the cache rather than over the S tokens alone.
        """
        seqlen = tokens.shape[1]
        if positions is None:
            if seqlen > self.rope_cos.shape[0]:
                raise ValueError(f"sequence of {seqlen} tokens is longer than max_seq_len {self.rope_cos.shape[0]}")
            positions = torch.arange(seqlen, device=tokens.device)
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # [S, D/2] or [B, S, D/2]
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, cos, sin, positions, mask, cache)
        if last_only:
            h = h[:, -1:]
        return self.output(self.norm(h)) if head else self.norm(h)

    def init_rope(self, device=None) -> None:
        """(Re)compute the RoPE tables, e.g. after building the model on the meta device."""
        cos, sin = rope_table(self.args, device=device or self.tok_embeddings.weight.device)
        self.rope_cos, self.rope_sin = cos, sin

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, seed: int | None = None) -> None:
        """Fresh weights for pretraining: N(0, std), with the residual projections scaled by 1/sqrt(2 n_layers)."""
        gen = None
        if seed is not None:
            gen = torch.Generator(device=self.tok_embeddings.weight.device).manual_seed(seed)
        for name, p in self.named_parameters():
            if p.ndim == 1:
                p.fill_(1.0)  # norm weights
            else:
                scale = std / math.sqrt(2 * self.args.n_layers) if name.endswith(("wo.weight", "w2.weight")) else std
                p.normal_(0.0, scale, generator=gen)
