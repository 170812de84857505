"""Post-training data: conversations and preference pairs in TRL's formats, as token ids and loss masks.

    records = read_records("chat.jsonl")                 # JSONL (.gz) or Parquet rows, as dicts
    example = encode_conversation(chat, to_messages(r))  # Example(ids, loss): loss on assistant turns only
    loader = ChatLoader(examples, seq_len=512, batch_size=8, seed=0)   # packed rows, endless, resumable
    batch = next(loader)                                 # data.loader.Batch(inputs, targets, doc_ids)

Formats (one JSON object a line, or a Parquet row):

    {"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}, ...]}
    {"prompt": "..." or messages, "completion": "..." or messages}
    {"prompt": messages, "chosen": messages, "rejected": messages, "edited": messages (optional)}

A conversation is tokenised with the Llama 3 chat format (``tokenizer/chat.py``). Only the assistant's
content and its ``<|eot_id|>`` carry loss (``eot_loss=False`` leaves the eot out too, as DPO's
log-probabilities do); ``<|begin_of_text|>``, headers, system, user and tool turns do not. Several
conversations are packed into one row, each its own document: the document mask keeps them apart and
RoPE positions restart at each (``model/masks.py``), exactly as pretraining packs documents.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from llamaherd.data.loader import IGNORE_INDEX, Batch
from llamaherd.data.records import read_records  # noqa: F401 (part of this module's interface)
from llamaherd.errors import HerdError
from llamaherd.tokenizer.chat import ChatFormat, check_message

CHAT_TOKENS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


@dataclass
class Example:
    """One tokenised conversation: ``ids`` and, per token, whether the model is trained to predict it."""

    ids: list[int]
    loss: list[bool]

    def __len__(self) -> int:
        return len(self.ids)


def chat_format(tokenizer) -> ChatFormat:
    """The chat format of ``tokenizer``; a one-line error when it lacks the Llama 3 chat special tokens."""
    missing = [t for t in CHAT_TOKENS if t not in getattr(tokenizer, "special_tokens", {})]
    if missing:
        raise HerdError(f"the tokenizer has no {', '.join(missing)}: post-training needs the Llama 3 chat special "
                        "tokens (a Llama 3 tokenizer, or one trained by herd)")
    return ChatFormat(tokenizer)


def _messages(value, role: str, where: str) -> list[dict]:
    """A list of messages from a string (one message of ``role``) or a list of messages."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if not isinstance(value, list) or not value:
        raise HerdError(f"{where}: expected a string or a non-empty list of messages")
    for i, m in enumerate(value):
        check_message(m, f"{where}[{i}]")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def to_messages(record: dict, where: str = "record") -> list[dict]:
    """The conversation of a ``{"messages"}`` or ``{"prompt", "completion"}`` record."""
    if "messages" in record:
        return _messages(record["messages"], "user", f"{where}: messages")
    if "prompt" in record and "completion" in record:
        return (_messages(record["prompt"], "user", f"{where}: prompt")
                + _messages(record["completion"], "assistant", f"{where}: completion"))
    raise HerdError(f"{where}: expected 'messages', or 'prompt' and 'completion' (keys: {', '.join(record)})")


def to_preference(record: dict, where: str = "record") -> dict[str, list[dict]]:
    """``{"prompt", "chosen", "rejected"[, "edited"]}`` as message lists; chosen and rejected must differ."""
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in record]
    if missing:
        raise HerdError(f"{where}: a preference pair needs 'prompt', 'chosen' and 'rejected' (missing: "
                        f"{', '.join(missing)})")
    pair = {"prompt": _messages(record["prompt"], "user", f"{where}: prompt")}
    for key in ("chosen", "rejected", "edited"):
        if record.get(key) is not None:
            pair[key] = _messages(record[key], "assistant", f"{where}: {key}")
    if pair["chosen"] == pair["rejected"]:
        raise HerdError(f"{where}: chosen and rejected are the same response; a pair must differ")
    return pair


def encode_conversation(chat: ChatFormat, messages: Sequence[dict], *, eot_loss: bool = True,
                        where: str = "conversation") -> Example:
    """Token ids of ``messages`` in the chat format (no generation prompt), loss on the assistant's content
    (and its ``<|eot_id|>`` unless ``eot_loss`` is False)."""
    if not any(m.get("role") == "assistant" for m in messages):
        raise HerdError(f"{where}: has no assistant turn, so nothing to learn from")
    tok = chat.tokenizer
    ids, loss = [tok.bos_id], [False]
    for i, m in enumerate(messages):
        role, content = check_message(m, f"{where}: message {i}")
        header = chat.encode_header(role)
        body = tok.encode(content.strip())
        learn = role == "assistant"
        ids += header + body + [tok.eot_id]
        loss += [False] * len(header) + [learn] * len(body) + [learn and eot_loss]
    return Example(ids, loss)


def encode_records(chat: ChatFormat, records, *, on_error=None) -> tuple[list[Example], int]:
    """(examples, skipped) of (where, record) pairs; a bad record is a HerdError, or, with ``on_error``,
    reported to it (``on_error(message)``) and counted as skipped."""
    examples, skipped = [], 0
    for where, record in records:
        try:
            examples.append(encode_conversation(chat, to_messages(record, where), where=where))
        except HerdError as e:
            if on_error is None:
                raise
            on_error(str(e))
            skipped += 1
    return examples, skipped


def pack(examples: Sequence[Example], order: Sequence[int], seq_len: int) -> Iterator[tuple[np.ndarray, ...]]:
    """Rows of ``seq_len`` positions: (inputs, targets, doc_ids), the examples of ``order`` placed whole and in
    turn (a row closes when the next one does not fit; the rest is padding, its own document, no loss); an
    example longer than a row is cut to ``seq_len + 1`` tokens."""
    inputs = np.zeros(seq_len, dtype=np.int64)
    targets = np.full(seq_len, IGNORE_INDEX, dtype=np.int64)
    doc_ids = np.zeros(seq_len, dtype=np.int32)
    used, doc = 0, 0
    for i in order:
        ex = examples[i]
        ids, loss = ex.ids[:seq_len + 1], ex.loss[:seq_len + 1]
        n = len(ids) - 1  # positions: each predicts the next token
        if n < 1:
            continue
        if used + n > seq_len:
            doc_ids[used:] = doc
            yield inputs, targets, doc_ids
            inputs = np.zeros(seq_len, dtype=np.int64)
            targets = np.full(seq_len, IGNORE_INDEX, dtype=np.int64)
            doc_ids = np.zeros(seq_len, dtype=np.int32)
            used, doc = 0, 0
        inputs[used:used + n] = ids[:-1]
        targets[used:used + n] = np.where(loss[1:], ids[1:], IGNORE_INDEX)
        doc_ids[used:used + n] = doc
        used, doc = used + n, doc + 1
    if used:
        doc_ids[used:] = doc
        yield inputs, targets, doc_ids


def _batch(rows: list[tuple[np.ndarray, ...]]) -> Batch:
    return Batch(*(torch.from_numpy(np.stack(column)) for column in zip(*rows, strict=True)))


class ChatLoader:
    """Endless batches of packed rows of ``examples``, shuffled anew each epoch from ``(seed, epoch)``.

    With ``world`` data-parallel ranks, global batch ``g`` is rows ``g*W*B .. (g+1)*W*B`` of the stream of
    rows (epoch after epoch) and rank ``rank`` takes its ``B`` of them. ``state_dict`` is the number of global
    batches served; loading it replays the packing up to there (fast: no model involved)."""

    def __init__(self, examples: Sequence[Example], seq_len: int, batch_size: int, seed: int = 0,
                 rank: int = 0, world: int = 1):
        if not examples:
            raise HerdError("no training examples: the data is empty")
        self.examples, self.seq_len, self.batch_size = examples, seq_len, batch_size
        self.seed, self.rank, self.world = seed, rank, world
        self.batches = 0
        self._restart()

    def _restart(self) -> None:
        self._rows = self._stream()

    def _stream(self) -> Iterator[tuple[np.ndarray, ...]]:
        epoch = 0
        while True:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))
            yield from pack(self.examples, order, self.seq_len)
            epoch += 1

    def __iter__(self) -> "ChatLoader":
        return self

    def __next__(self) -> Batch:
        rows = [next(self._rows) for _ in range(self.batch_size * self.world)]
        self.batches += 1
        return _batch(rows[self.rank * self.batch_size:(self.rank + 1) * self.batch_size])

    def state_dict(self) -> dict:
        return {"batches": self.batches, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise HerdError(f"the checkpoint's data order has seed {state['seed']}, this run {self.seed}")
        self.batches = 0
        self._restart()
        for _ in range(state["batches"] * self.batch_size * self.world):
            next(self._rows)
        self.batches = state["batches"]


def eval_batches(examples: Sequence[Example], seq_len: int, batch_size: int) -> list[Batch]:
    """The examples packed in their order, in batches (the last one may be smaller): the same every time."""
    rows = list(pack(examples, range(len(examples)), seq_len))
    return [_batch(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]


# --- preference pairs ---------------------------------------------------------------------------------------


@dataclass
class PairExample:
    """A tokenised preference pair: the same prompt with the chosen and with the rejected response."""

    chosen: Example
    rejected: Example


def encode_pair(chat: ChatFormat, pair: dict, *, eot_loss: bool = True, where: str = "pair") -> PairExample:
    """``{"prompt", "chosen", "rejected"}`` message lists (``to_preference``) as two conversations."""
    return PairExample(encode_conversation(chat, pair["prompt"] + pair["chosen"], eot_loss=eot_loss, where=where),
                       encode_conversation(chat, pair["prompt"] + pair["rejected"], eot_loss=eot_loss, where=where))


def ranked_pairs(pair: dict) -> list[dict]:
    """The pairs a record ranks: chosen > rejected and, with an ``edited`` response (Llama 3: edited >
    chosen > rejected), edited > chosen and edited > rejected too."""
    out = [pair]
    if pair.get("edited") is not None and pair["edited"] != pair["chosen"]:
        out += [{"prompt": pair["prompt"], "chosen": pair["edited"], "rejected": pair[k]}
                for k in ("chosen", "rejected")]
    return out


@dataclass
class PairBatch:
    """``B`` pairs as ``2B`` rows, the chosen ones first: ``tokens`` right-padded, ``targets`` the next token
    where it carries loss (else -100), ``last`` each row's last real position, ``index`` the pairs' numbers
    in their dataset (to look precomputed reference log-probabilities up)."""

    tokens: torch.Tensor  # [2B, S]
    targets: torch.Tensor  # [2B, S]
    last: torch.Tensor  # [2B]
    index: torch.Tensor  # [B]

    def to(self, device, non_blocking: bool = False) -> "PairBatch":
        return PairBatch(*(t.to(device, non_blocking=non_blocking) for t in vars(self).values()))


def pair_batch(pairs: Sequence[PairExample], index: Sequence[int], seq_len: int, pad_id: int = 0) -> PairBatch:
    """The pairs ``index`` of ``pairs`` as a PairBatch, each row cut to ``seq_len`` tokens."""
    rows = [pairs[i].chosen for i in index] + [pairs[i].rejected for i in index]
    width = min(max(len(r) for r in rows), seq_len)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    last = torch.zeros(len(rows), dtype=torch.long)
    for b, r in enumerate(rows):
        ids, loss = r.ids[:width], r.loss[:width]
        n = len(ids)
        tokens[b, :n] = torch.tensor(ids)
        targets[b, :n - 1] = torch.tensor([t if keep else IGNORE_INDEX for t, keep in zip(ids[1:], loss[1:])])
        last[b] = n - 1
    return PairBatch(tokens, targets, last, torch.tensor(list(index), dtype=torch.long))


class PairLoader:
    """Endless batches of ``batch_size`` preference pairs, shuffled anew each epoch from ``(seed, epoch)``;
    ``state_dict`` is the number of batches served (a resumed run continues with exactly the next one).

    Grouped by length, as Hugging Face's ``group_by_length``: each run of ``group`` batches' worth of the
    shuffled pairs is sorted by length and cut into batches, which are then shuffled, so that a batch of
    short pairs is not padded to one long pair's length (``group=1``: plain shuffling)."""

    def __init__(self, pairs: Sequence[PairExample], seq_len: int, batch_size: int, seed: int = 0, group: int = 32):
        if not pairs:
            raise HerdError("no preference pairs: the data is empty")
        self.pairs, self.seq_len, self.batch_size, self.seed, self.group = pairs, seq_len, batch_size, seed, group
        self.lengths = np.array([max(len(p.chosen), len(p.rejected)) for p in pairs])
        self.batches = 0
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, its order)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.pairs))
        span = self.batch_size * self.group
        if self.group <= 1:
            return order
        out = []
        for start in range(0, len(order), span):
            chunk = order[start : start + span]
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            batches = [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
            out += [batches[i] for i in rng.permutation(len(batches))]
        return np.concatenate(out)

    def _indices(self, batch: int) -> list[int]:
        n, out = len(self.pairs), []
        for k in range(batch * self.batch_size, (batch + 1) * self.batch_size):
            epoch, i = divmod(k, n)
            if self._order is None or self._order[0] != epoch:
                self._order = (epoch, self._epoch_order(epoch))
            out.append(int(self._order[1][i]))
        return out

    def __iter__(self) -> "PairLoader":
        return self

    def __next__(self) -> PairBatch:
        batch = pair_batch(self.pairs, self._indices(self.batches), self.seq_len)
        self.batches += 1
        return batch

    def state_dict(self) -> dict:
        return {"batches": self.batches, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise HerdError(f"the checkpoint's data order has seed {state['seed']}, this run {self.seed}")
        self.batches = state["batches"]


def pair_eval_batches(pairs: Sequence[PairExample], seq_len: int, batch_size: int) -> list[PairBatch]:
    """Every pair once, in batches of pairs of about the same length (each batch's ``index`` says which),
    the batches in an order drawn once from seed 0 (so that the first few, which the Trainer's periodic
    evaluation reads, mix lengths): the same every time."""
    order = sorted(range(len(pairs)), key=lambda i: -max(len(pairs[i].chosen), len(pairs[i].rejected)))
    batches = [pair_batch(pairs, order[i : i + batch_size], seq_len) for i in range(0, len(pairs), batch_size)]
    return [batches[i] for i in np.random.default_rng(0).permutation(len(batches))]
