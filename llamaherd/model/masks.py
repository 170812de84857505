"""Attention masks, built by the caller and handed to the model: block-causal over the documents of
packed training rows, and causal over a KV cache by position.

A packed row holds several documents back to back; ``doc_ids[b, t]`` numbers the document that
token t of row b belongs to. A token may attend to an earlier token only of its own document,
and RoPE positions restart at 0 at the start of each document, so every document is processed
exactly as if it were alone (Llama 3 paper, section 3.2).

On CUDA the mask is a FlexAttention ``BlockMask``: blocks that are entirely masked are skipped,
which is what makes document masking cheaper than plain causal attention. Elsewhere it is a
dense boolean mask for ``scaled_dot_product_attention``.

With a KV cache, ``causal_mask(positions, kv_len)`` lets each new token see every cache position up to
its own: the mask's width ``kv_len`` is how many cache positions the attention reads (see
``llamaherd.generation.StaticKVCache`` for the other forms a cache may take).
"""

from __future__ import annotations

import torch


def doc_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """Position of each token inside its document: [B, S] -> [B, S] (int64, 0 at each start)."""
    seq = doc_ids.shape[-1]
    t = torch.arange(seq, device=doc_ids.device).expand_as(doc_ids)
    is_start = torch.ones_like(doc_ids, dtype=torch.bool)
    is_start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start = torch.where(is_start, t, torch.zeros_like(t)).cummax(dim=-1).values
    return t - start


def dense_doc_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """[B, S] document ids -> [B, 1, S, S] boolean mask (True = may attend)."""
    seq = doc_ids.shape[-1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=doc_ids.device).tril()
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
    return (same_doc & causal)[:, None]


def flex_doc_mask(doc_ids: torch.Tensor):
    """[B, S] document ids -> FlexAttention BlockMask (CUDA)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def block_causal(b, h, q_idx, kv_idx):
        return (doc_ids[b, q_idx] == doc_ids[b, kv_idx]) & (q_idx >= kv_idx)

    batch, seq = doc_ids.shape
    return create_block_mask(block_causal, batch, None, seq, seq, device=doc_ids.device)


def doc_mask(doc_ids: torch.Tensor, *, flex: bool | None = None):
    """The block-causal mask for ``doc_ids`` in the form the attention on this device uses."""
    if flex is None:
        flex = doc_ids.is_cuda
    return flex_doc_mask(doc_ids) if flex else dense_doc_mask(doc_ids)


def causal_mask(positions: torch.Tensor, kv_len: int) -> torch.Tensor:
    """Causal attention over the first ``kv_len`` positions of a KV cache, by position.

    ``positions`` [S] (shared by every row) or [B, S] (per row) -> boolean mask [1, 1, S, kv_len] or
    [B, 1, S, kv_len]: a token at position p may attend to cache positions 0..p.
    """
    mask = torch.arange(kv_len, device=positions.device) <= positions[..., None]
    return mask[None, None] if positions.dim() == 1 else mask[:, None]
