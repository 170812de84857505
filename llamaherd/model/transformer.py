"""The Llama 3 transformer, as in Meta's reference: parameter names match Meta's checkpoints.

tokens -> tok_embeddings -> n_layers x [x + attention(attention_norm(x)); x + feed_forward(ffn_norm(x))]
       -> norm -> output -> logits

The model knows nothing of parallelism or compilation; those are applied from outside.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from llamaherd.model.args import ModelArgs
from llamaherd.model.masks import doc_mask, doc_positions


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


def grouped_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention of one new token per row over the filled part of the KV cache, as two products.

    q [B, H, 1, D]; k, v [B, H_kv, T, D]. Each KV head serves its group of H / H_kv query heads
    (head i uses KV head i // group, as SDPA's ``enable_gqa``) without being repeated. Compiled
    (the ahead-of-time CPU decode step) this costs less than the fused SDPA kernel, whose per-call
    setup outweighs one query's work; run eagerly, SDPA's single call is cheaper (docs/benchmarks.md).
    """
    b, h, _, d = q.shape
    groups = q.view(b, k.shape[1], h // k.shape[1], d)  # [B, H_kv, group, D]
    scores = (groups @ k.transpose(-1, -2)).float() * d**-0.5  # [B, H_kv, group, T]
    return (torch.softmax(scores, dim=-1).type_as(q) @ v).view(b, h, 1, d)


class KVCache(nn.Module):
    """Static key/value cache: [batch, n_kv_heads, max_seq_len, head_dim]; KV heads are not repeated."""

    def __init__(self, batch: int, max_seq_len: int, n_kv_heads: int, head_dim: int, dtype, device=None):
        super().__init__()
        shape = (batch, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        self.k.index_copy_(2, input_pos, k)
        self.v.index_copy_(2, input_pos, v)
        return self.k, self.v


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
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        self.cache: KVCache | None = None

    def forward(self, x, cos, sin, mask=None, input_pos=None, kv_len=None):
        bsz, seqlen, _ = x.shape
        q = self.wq(x).view(bsz, seqlen, self.n_heads, self.head_dim)
        k = self.wk(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, S, D]
        gqa = self.n_heads != self.n_kv_heads
        if self.cache is not None and input_pos is not None:
            k, v = self.cache.update(input_pos, k, v)
            if kv_len is not None:  # eager decoding: attend to the filled part of the cache only
                k, v = k[:, :, :kv_len], v[:, :, :kv_len]  # the mask is already kv_len wide
                if seqlen == 1:  # the one new token sees every filled position: no mask to apply
                    if torch.compiler.is_compiling() and not q.is_cuda:  # the exported CPU decode step
                        out = grouped_decode_attention(q, k, v)
                    else:
                        out = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
                    return self.wo(out.transpose(1, 2).reshape(bsz, 1, -1))
        if mask is not None and not isinstance(mask, torch.Tensor):  # a FlexAttention BlockMask
            out = _flex_attention(q.is_cuda)(q, k, v, block_mask=mask, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)
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
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, mask=None, input_pos=None, kv_len=None):
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, input_pos, kv_len)
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

    def forward(self, tokens: torch.Tensor, *, doc_ids: torch.Tensor | None = None,
                input_pos: torch.Tensor | None = None, kv_len: int | None = None, mask=None,
                last_only: bool = False) -> torch.Tensor:
        """tokens [B, S] -> logits [B, S, vocab] (or [B, 1, vocab] with ``last_only``).

        doc_ids [B, S]: packed rows; attention stays inside each document, positions restart at 0.
        input_pos [S]: positions of ``tokens`` when decoding with the KV cache (see ``setup_cache``).
        kv_len: with input_pos, how many cache positions are filled (input_pos[-1] + 1); lets eager
            decoding skip the empty tail of the static cache. Leave it None under torch.compile.
        mask: a prebuilt ``doc_mask(doc_ids)``, to build it once for several forward passes.
        """
        seqlen = tokens.shape[1]
        if doc_ids is not None:
            pos = doc_positions(doc_ids)
            if mask is None:
                mask = doc_mask(doc_ids)
        elif input_pos is not None:
            pos = input_pos
            cache = self.layers[0].attention.cache
            if cache is None:
                raise RuntimeError("input_pos needs a KV cache: call setup_cache() first")
            cache_pos = torch.arange(cache.k.shape[2] if kv_len is None else kv_len, device=tokens.device)
            mask = (cache_pos <= input_pos[:, None])[None, None]  # [1, 1, S, kv_len or cache_len]: causal
        else:
            pos = torch.arange(seqlen, device=tokens.device)
        if input_pos is None and seqlen > self.rope_cos.shape[0]:
            raise ValueError(f"sequence of {seqlen} tokens is longer than max_seq_len {self.rope_cos.shape[0]}")
        cos, sin = self.rope_cos[pos], self.rope_sin[pos]
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, cos, sin, mask, input_pos, kv_len)
        if last_only:
            h = h[:, -1:]
        return self.output(self.norm(h))

    def setup_cache(self, batch_size: int, max_seq_len: int | None = None, dtype=None, device=None) -> None:
        """A static KV cache for decoding ``batch_size`` rows of up to ``max_seq_len`` tokens.

        A cache of the same shape that is already there is zeroed and kept, so that its tensors keep
        their addresses (a captured CUDA graph stays valid).
        """
        max_seq_len = max_seq_len or self.args.max_seq_len
        w = self.tok_embeddings.weight
        dtype, device = dtype or w.dtype, torch.device(device) if device is not None else w.device
        shape = (batch_size, self.args.n_kv_heads, max_seq_len, self.args.head_dim)
        for layer in self.layers:
            cache = layer.attention.cache
            if cache is not None and (cache.k.shape, cache.k.dtype, cache.k.device) == (shape, dtype, device):
                cache.k.zero_()
                cache.v.zero_()
            else:
                with torch.inference_mode(False):  # a normal tensor, which an exported decode step can update
                    layer.attention.cache = KVCache(batch_size, max_seq_len, self.args.n_kv_heads,
                                                    self.args.head_dim, dtype, device)

    def clear_cache(self) -> None:
        for layer in self.layers:
            layer.attention.cache = None

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
