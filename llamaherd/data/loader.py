"""The pretraining data loader: fixed-length rows cut from a stream of whole, shuffled documents.

Each epoch, the documents of a packed dataset are put in an order drawn from ``(seed, epoch)`` and
laid end to end; the epochs follow one another, so the stream never ends. Row ``k`` of the stream is
tokens ``[k*(S+1), (k+1)*(S+1))``: ``inputs = row[:-1]``, ``targets = row[1:]``. A document that does
not fit in what is left of a row goes on at the start of the next row, so nothing is cut away.

Rows are then served in a shuffled order: the stream's rows are taken in blocks of about one epoch
(at most ``MAX_SHUFFLE_ROWS``), and each block is permuted (drawn from ``(seed, block)``). Without this
a batch would hold consecutive rows of one long document, and successive steps would see one source
file each, which makes the gradient noise far larger.

Targets that would predict the first token of another document are ``IGNORE_INDEX``, and ``doc_ids``
numbers the documents within each row from 0, so the model can build a block-causal (document) mask
and restart RoPE positions at each document.

With ``world_size`` data-parallel ranks, global batch ``g`` is served rows ``g*W*B .. (g+1)*W*B`` (in
shuffled order), and rank ``r`` gets rows ``r*B .. (r+1)*B`` of it: ranks never share a row. The
loader's position is the number of global batches served (``state_dict``), so a resumed run continues
with exactly the next batch, under any number of ranks that keeps the global batch's rows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from llamaherd.data.pack import PackedDataset
from llamaherd.errors import HerdError

IGNORE_INDEX = -100
STATE_VERSION = 2
MAX_SHUFFLE_ROWS = 1 << 20  # rows permuted together: about an epoch, bounded for huge datasets


@dataclass
class Batch:
    inputs: torch.Tensor  # [B, S] int64 token ids
    targets: torch.Tensor  # [B, S] int64: the next token, or IGNORE_INDEX where it starts another document
    doc_ids: torch.Tensor  # [B, S] int32: document number within the row, from 0

    def to(self, device, non_blocking: bool = False) -> "Batch":
        return Batch(*(t.to(device, non_blocking=non_blocking) for t in (self.inputs, self.targets, self.doc_ids)))


def _read(ds: PackedDataset, order: np.ndarray, ends: np.ndarray, pos: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokens ``[pos, pos+n)`` of the stream of documents ``order`` (``ends``: their cumulative lengths),
    and a mask of the positions where a document starts."""
    i0 = int(np.searchsorted(ends, pos, side="right"))
    i1 = int(np.searchsorted(ends, pos + n - 1, side="right")) + 1
    docs, doc_end = order[i0:i1], ends[i0:i1]
    doc_begin = doc_end - ds.doc_len[docs]
    a, b = np.maximum(doc_begin, pos), np.minimum(doc_end, pos + n)
    tokens = ds.gather(docs, a - doc_begin, b - a)
    starts = np.zeros(n, dtype=bool)
    starts[doc_begin[doc_begin >= pos] - pos] = True
    return tokens, starts


def _batch(tokens: np.ndarray, starts: np.ndarray, seq_len: int, valid: np.ndarray | None = None) -> Batch:
    """Cut flat ``tokens`` (and their document-start mask) into rows of ``seq_len + 1``; make a Batch."""
    t, f = tokens.reshape(-1, seq_len + 1), starts.reshape(-1, seq_len + 1)
    targets = t[:, 1:].copy()
    targets[f[:, 1:]] = IGNORE_INDEX
    if valid is not None:  # padding at the end of an evaluation pass
        targets[~valid.reshape(-1, seq_len + 1)[:, 1:]] = IGNORE_INDEX
    new_doc = f[:, :-1].copy()
    new_doc[:, 0] = False  # each row numbers its documents from 0, a continued one included
    doc_ids = np.cumsum(new_doc, axis=1, dtype=np.int32)
    inputs = np.ascontiguousarray(t[:, :-1])
    return Batch(torch.from_numpy(inputs), torch.from_numpy(targets), torch.from_numpy(doc_ids))


def _open(dataset) -> PackedDataset:
    return PackedDataset(dataset) if isinstance(dataset, (str, os.PathLike)) else dataset


class PackedLoader:
    """Infinite iterator of ``Batch`` es of ``batch_size`` rows of ``seq_len`` tokens for one rank."""

    def __init__(
        self,
        dataset: PackedDataset | str | os.PathLike,
        batch_size: int,
        seq_len: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ):
        self.dataset = ds = _open(dataset)
        for name, value, low in (
            ("batch_size", batch_size, 1),
            ("seq_len", seq_len, 1),
            ("world_size", world_size, 1),
            ("seed", seed, 0),
        ):
            if not isinstance(value, (int, np.integer)) or value < low:
                raise HerdError(f"{name} must be an integer >= {low}, got {value!r}")
        if not 0 <= rank < world_size:
            raise HerdError(f"rank must be in [0, {world_size}), got {rank}")
        if ds.n_tokens < seq_len + 1:
            raise HerdError(
                f"{ds.path}: dataset has {ds.n_tokens} tokens, fewer than one row of seq_len+1 = {seq_len + 1}"
            )
        self.batch_size, self.seq_len, self.seed = int(batch_size), int(seq_len), int(seed)
        self.rank, self.world_size, self.shuffle = int(rank), int(world_size), bool(shuffle)
        self.batches = 0  # global batches served so far: the whole position
        self._orders: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.block_rows = max(1, min(ds.n_tokens // (self.seq_len + 1), MAX_SHUFFLE_ROWS))
        self._perm: tuple[int, np.ndarray] | None = None

    def order(self, epoch: int) -> np.ndarray:
        """The order of the documents in ``epoch``: a permutation drawn from ``(seed, epoch)``."""
        return self._order(epoch)[0]

    def _order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if epoch not in self._orders:
            n = self.dataset.n_docs
            order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            if len(self._orders) >= 2:  # keep the current epoch and the next one
                del self._orders[min(self._orders)]
            self._orders[epoch] = order, np.cumsum(self.dataset.doc_len[order])
        return self._orders[epoch]

    def row_index(self, served: int) -> int:
        """The stream row served ``served``-th: rows are permuted within blocks of ``block_rows``."""
        block, within = divmod(served, self.block_rows)
        if not self.shuffle:
            return served
        if self._perm is None or self._perm[0] != block:
            self._perm = block, np.random.default_rng([self.seed, 1 << 32, block]).permutation(self.block_rows)
        return block * self.block_rows + int(self._perm[1][within])

    def _row(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens of stream row ``k`` and its document-start mask (a row may run into the next epoch)."""
        n, epoch_tokens = self.seq_len + 1, self.dataset.n_tokens
        epoch, pos = divmod(k * n, epoch_tokens)
        pieces, left = [], n
        while left:  # more than one piece only where the row crosses into the next epoch
            take = min(left, epoch_tokens - pos)
            pieces.append(_read(self.dataset, *self._order(epoch), pos, take))
            epoch, pos, left = epoch + 1, 0, left - take
        if len(pieces) == 1:
            return pieces[0]
        return np.concatenate([t for t, _ in pieces]), np.concatenate([s for _, s in pieces])

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        first = (self.batches * self.world_size + self.rank) * self.batch_size
        rows = [self._row(self.row_index(i)) for i in range(first, first + self.batch_size)]
        self.batches += 1
        return _batch(np.concatenate([t for t, _ in rows]), np.concatenate([s for _, s in rows]), self.seq_len)

    def state_dict(self) -> dict:
        """The position (global batches served) and the settings it is only valid with (JSON-serialisable)."""
        return {
            "version": STATE_VERSION,
            "batches": self.batches,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "world_size": self.world_size,
            "rank": self.rank,
            "n_docs": self.dataset.n_docs,
            "n_tokens": self.dataset.n_tokens,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``. The stream position is global, so a state saved by any rank will do;
        settings that change the stream (seed, shuffle, batch_size, seq_len, world_size, dataset) must match."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise HerdError(f"loader state: expected a dict with version {STATE_VERSION}")
        mine = self.state_dict()
        for key in ("seed", "shuffle", "batch_size", "seq_len", "world_size", "n_docs", "n_tokens"):
            if key not in state:
                raise HerdError(f"loader state: missing {key!r}")
        for key in ("seed", "shuffle", "seq_len", "n_docs", "n_tokens"):
            if state[key] != mine[key]:
                raise HerdError(f"loader state has {key}={state[key]!r} but this loader has {key}={mine[key]!r}")
        # the ranks may be laid out otherwise (dp 4 x 2 rows resumed as dp 2 x 4 rows): the global batches
        # are the same rows as long as each holds as many
        theirs, ours = state["batch_size"] * state["world_size"], self.batch_size * self.world_size
        if theirs != ours:
            raise HerdError(f"loader state has global batches of {theirs} rows (batch_size {state['batch_size']} x "
                            f"world_size {state['world_size']}) but this loader's have {ours}")
        batches = state.get("batches")
        if not isinstance(batches, int) or batches < 0:
            raise HerdError(f"loader state: 'batches' must be a non-negative integer, got {batches!r}")
        self.batches = batches


def iter_eval_batches(
    dataset: PackedDataset | str | os.PathLike, batch_size: int, seq_len: int, max_batches: int | None = None
) -> Iterator[Batch]:
    """One unshuffled pass over ``dataset`` in pack order, for validation loss; the same batches every time.

    Rows are cut as in training. The last row is padded (with token 0, targets IGNORE_INDEX) and the
    last batch may have fewer rows, so every token of the dataset is predicted exactly once.
    """
    ds = _open(dataset)
    order, ends = np.arange(ds.n_docs), np.cumsum(ds.doc_len)
    row, pos, k = seq_len + 1, 0, 0
    while pos < ds.n_tokens and (max_batches is None or k < max_batches):
        n = min(batch_size * row, ds.n_tokens - pos)
        tokens, starts = _read(ds, order, ends, pos, n)
        pad = -n % row
        valid = None
        if pad:
            tokens = np.concatenate([tokens, np.zeros(pad, np.int64)])
            starts = np.concatenate([starts, np.arange(pad) == 0])  # the padding is a "document" of its own
            valid = np.arange(n + pad) < n
        yield _batch(tokens, starts, seq_len, valid)
        pos, k = pos + n, k + 1
