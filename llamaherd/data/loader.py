"""The pretraining data loader: fixed-length rows cut from a stream of whole, shuffled documents.

Each epoch, the documents of a packed dataset are put in an order drawn from ``(seed, epoch)`` and
laid end to end; the epochs follow one another, so the stream never ends. Row ``k`` of the stream is
tokens ``[k*(S+1), (k+1)*(S+1))``: ``inputs = row[:-1]``, ``targets = row[1:]``. A document that does
not fit in what is left of a row goes on at the start of the next row, so nothing is cut away.

Targets that would predict the first token of another document are ``IGNORE_INDEX``, and ``doc_ids``
numbers the documents within each row from 0, so the model can build a block-causal (document) mask
and restart RoPE positions at each document.

With ``world_size`` data-parallel ranks, global batch ``g`` is the ``world_size * B`` rows after the
previous global batch, and rank ``r`` gets rows ``r*B .. (r+1)*B`` of it: ranks never share a row.
The loader's position is a few integers (``state_dict``), so a resumed run continues with exactly
the next batch.
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
STATE_VERSION = 1


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
        self.epoch = self.pos = self.batches = 0  # where the next global batch starts; batches yielded
        self._orders: dict[int, tuple[np.ndarray, np.ndarray]] = {}

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

    def _skip(self, epoch: int, pos: int, n: int) -> tuple[int, int]:
        epoch_tokens = self.dataset.n_tokens  # every epoch streams every token once
        pos += n
        return epoch + pos // epoch_tokens, pos % epoch_tokens

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        n = self.batch_size * (self.seq_len + 1)
        epoch, pos = self._skip(self.epoch, self.pos, self.rank * n)
        pieces, left = [], n
        while left:  # more than one piece only where the rows cross into the next epoch
            take = min(left, self.dataset.n_tokens - pos)
            pieces.append(_read(self.dataset, *self._order(epoch), pos, take))
            epoch, pos = self._skip(epoch, pos, take)
            left -= take
        self.epoch, self.pos = self._skip(self.epoch, self.pos, self.world_size * n)
        self.batches += 1
        if len(pieces) == 1:
            return _batch(*pieces[0], self.seq_len)
        return _batch(np.concatenate([t for t, _ in pieces]), np.concatenate([s for _, s in pieces]), self.seq_len)

    def state_dict(self) -> dict:
        """Where the next global batch starts, and the settings it is only valid with (JSON-serialisable)."""
        order, ends = self._order(self.epoch)
        doc = int(np.searchsorted(ends, self.pos, side="right"))
        offset = self.pos - int(ends[doc] - self.dataset.doc_len[order[doc]])
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "doc": doc,  # position in this epoch's document order
            "offset": offset,  # tokens of that document already consumed
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
            if state[key] != mine[key]:
                raise HerdError(f"loader state has {key}={state[key]!r} but this loader has {key}={mine[key]!r}")
        try:
            epoch, doc, offset, batches = (int(state[k]) for k in ("epoch", "doc", "offset", "batches"))
        except (KeyError, TypeError, ValueError) as e:
            raise HerdError(f"loader state: bad or missing position ({type(e).__name__}: {e})") from None
        where = f"loader state: position epoch={epoch} doc={doc} offset={offset} is outside the dataset"
        if epoch < 0 or not 0 <= doc < self.dataset.n_docs:
            raise HerdError(where)
        order, ends = self._order(epoch)
        if not 0 <= offset < self.dataset.doc_len[order[doc]]:
            raise HerdError(where)
        self.epoch, self.batches = epoch, batches
        self.pos = int(ends[doc] - self.dataset.doc_len[order[doc]]) + offset


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
