"""A KV cache in fixed-size blocks (paged): memory for what each request has, not for its maximum length.

    pool = BlockPool(model.args, n_blocks=512, block_size=16)
    table = pool.allocate(n)                 # block ids for n positions (None when the pool is short)
    cache = pool.view([table_a, table_b], [n_a, n_b], positions)  # a model.KVCache, one row each
    logits = model(tokens, positions, mask=..., cache=cache)
    pool.free(table_a)

Per layer, keys and values live in one pool of ``n_blocks x block_size`` slots of ``[n_kv_heads,
head_dim]``; position ``p`` of a request is slot ``p % block_size`` of block ``table[p // block_size]``.
A forward writes each row's new keys and values to their slots, then gathers every row's slots (padded
to the longest row, masked) and attends with the model's own attention function.

Rows of a batched prefill are left-padded to the longest prompt: a padding token has position -1, its keys
and values go to a scratch block that no request owns (the padding of block tables points there too), and
no real token ever attends to it.
"""

from __future__ import annotations

import threading

import torch

from llamaherd.model.args import ModelArgs
from llamaherd.model.transformer import attention


class BlockPool:
    """The blocks of every layer, and which are free."""

    def __init__(self, args: ModelArgs, n_blocks: int, block_size: int = 16, dtype=torch.float32, device=None):
        if n_blocks < 1 or block_size < 1:
            raise ValueError("n_blocks and block_size must be at least 1")
        self.n_blocks, self.block_size = n_blocks, block_size
        # one block more than asked: the scratch block (the last), never handed out
        shape = ((n_blocks + 1) * block_size, args.n_kv_heads, args.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.n_layers)]
        self._free = list(range(n_blocks - 1, -1, -1))  # a stack: the lowest ids first
        self._lock = threading.Lock()

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.n_blocks - len(self._free)

    def blocks_for(self, positions: int) -> int:
        return -(-positions // self.block_size)

    def allocate(self, positions: int, table: list[int] | None = None) -> list[int] | None:
        """Grow ``table`` (or a new one) to hold ``positions`` positions; None, and nothing taken, when short."""
        table = [] if table is None else table
        need = self.blocks_for(positions) - len(table)
        with self._lock:
            if need > len(self._free):
                return None
            table.extend(self._free.pop() for _ in range(max(need, 0)))
        return table

    def free(self, table: list[int]) -> None:
        with self._lock:
            self._free.extend(reversed(table))
        table.clear()

    def view(self, tables: list[list[int]], lengths: list[int], positions: torch.Tensor) -> "PagedView":
        """A cache over these requests' blocks for one forward of tokens at ``positions`` [B, S] (-1: padding);
        ``lengths``: the positions each row will hold after it (its tokens so far, the new ones included)."""
        return PagedView(self, tables, lengths, positions)


class PagedView:
    """``model.KVCache`` over some requests' blocks (row ``b`` is request ``b``), for one forward. Everything
    but the layers' keys and values is worked out here, once, so that a compiled forward only reads it."""

    def __init__(self, pool: BlockPool, tables: list[list[int]], lengths: list[int], positions: torch.Tensor):
        self.pool = pool
        device = pool.k[0].device
        bs = pool.block_size
        longest = max(lengths)
        # the slot of every position of every row (past a row's table: the scratch block's, masked out)
        width = max(len(t) for t in tables)
        scratch = pool.n_blocks
        blocks = torch.tensor([t + [scratch] * (width - len(t)) for t in tables], dtype=torch.long)
        pos = torch.arange(longest)
        index = (blocks[:, pos // bs] * bs + pos % bs).to(device)  # [B, T]
        self.flat = index.reshape(-1)
        positions = positions.to(device)
        pad = positions < 0
        # where each new token's keys and values go (padding: the scratch block)
        self.slots = index.gather(1, positions.clamp(min=0)).masked_fill(pad, scratch * bs).reshape(-1)
        t = torch.arange(longest, device=device)
        lengths = torch.tensor(lengths, device=device)
        allowed = (t[None, None, :] <= positions[:, :, None]) & (t[None, None, :] < lengths[:, None, None])
        allowed |= pad[:, :, None] & (t == 0)  # a padding query sees one slot (no empty softmax), no one sees it
        self.allowed = allowed[:, None]  # [B, 1, S, T]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
               mask) -> torch.Tensor:
        """Write the rows' new keys and values at the view's positions (padding: to the scratch block), then
        attend over each row's slots: causally by position, never past the row's length."""
        b, h_kv, s, d = k.shape
        self.pool.k[layer].index_copy_(0, self.slots, k.transpose(1, 2).reshape(-1, h_kv, d))
        self.pool.v[layer].index_copy_(0, self.slots, v.transpose(1, 2).reshape(-1, h_kv, d))
        keys = self.pool.k[layer].index_select(0, self.flat).view(b, -1, h_kv, d).transpose(1, 2)  # [B, H_kv, T, D]
        values = self.pool.v[layer].index_select(0, self.flat).view(b, -1, h_kv, d).transpose(1, 2)
        return attention(q, keys, values, self.allowed, causal=False)
