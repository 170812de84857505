"""Train a Llama 3-style byte-level BPE tokenizer on raw text.

Training runs in Hugging Face ``tokenizers`` (Rust), set up so that its pre-tokenization is the one
tiktoken applies at encode time: Meta's pre-split regex as a ``Split`` pre-tokenizer, then
``ByteLevel(use_regex=False)``, which only maps each byte to a printable stand-in character. The
learned vocabulary is turned back into tiktoken ranks: the 256 single bytes at ranks 0..255 by
byte value, then the merged tokens in the order the merges were learned, so every token's rank is
above the ranks of the two tokens it was merged from.

    >>> ranks = train_bpe(texts, vocab_size=8192)
    >>> save_ranks(ranks, "tokenizer.model")   # loads with Tokenizer.from_file
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from pathlib import Path

from llamaherd.errors import HerdError
from llamaherd.tokenizer.tiktoken_bpe import PAT_STR


def byte_decoder() -> dict[str, int]:
    """ByteLevel's stand-in character -> byte (GPT-2's byte-to-printable table, inverted)."""
    from llamaherd.tokenizer.hf import bytes_to_unicode

    return {c: b for b, c in bytes_to_unicode().items()}


def pre_tokenizer():
    """The Hugging Face pre-tokenizer that splits text as tiktoken does with Llama 3's regex."""
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PAT_STR), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),  # bytes -> stand-in chars only
        ]
    )


def _progress(enabled: bool):
    if not (enabled and sys.stderr.isatty()):
        return nullcontext(None)
    from rich import progress as rp
    from rich.console import Console

    columns = (rp.SpinnerColumn(), rp.TextColumn("{task.description}"), rp.DownloadColumn(), rp.TransferSpeedColumn())
    return rp.Progress(*columns, rp.TimeElapsedColumn(), console=Console(stderr=True), transient=True)


def train_bpe(
    texts: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2, progress: bool = True
) -> dict[bytes, int]:
    """Mergeable ranks ``{token bytes: rank}`` learned from ``texts``.

    Exactly ``vocab_size`` ranks (256 single bytes + ``vocab_size - 256`` merges), or fewer when the
    corpus runs out of pairs seen at least ``min_frequency`` times. The result is deterministic:
    the same texts in the same order give the same ranks. A Llama 3 model built on it has
    ``len(ranks) + 256`` ids (the special tokens come after the ranks).
    """
    if vocab_size < 256:
        raise HerdError(f"vocab_size {vocab_size}: expected at least 256 (one token per byte)")
    if min_frequency < 1:
        raise HerdError(f"min_frequency {min_frequency}: expected at least 1")
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not
        special_tokens=[],
        show_progress=False,
    )
    with _progress(progress) as bar:
        task = bar.add_task("reading text", total=None) if bar else None

        def feed() -> Iterator[str]:
            for text in texts:
                if bar:
                    bar.advance(task, len(text.encode()))
                yield text
            if bar:
                bar.update(task, description="learning merges")

        hf.train_from_iterator(feed(), trainer)

    to_byte = byte_decoder()
    ranks = {bytes([b]): b for b in range(256)}
    for token, _ in sorted(hf.get_vocab().items(), key=lambda kv: kv[1]):  # HF ids follow merge order
        ranks.setdefault(bytes(to_byte[c] for c in token), len(ranks))
    return ranks


def save_ranks(ranks: dict[bytes, int], path: str | Path) -> None:
    """Write a tiktoken rank file (``tokenizer.model``) atomically: a temporary file, then a rename."""
    from llamaherd.tokenizer import Tokenizer

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        Tokenizer.from_ranks(ranks).save(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def capped_texts(docs: Iterable, max_bytes: int | None = None, counter: dict | None = None) -> Iterator[str]:
    """The texts of ``docs``, cut so that at most ``max_bytes`` UTF-8 bytes come out in all.

    ``counter`` (if given) gets the running ``bytes`` and ``documents`` totals.
    """
    counter = {} if counter is None else counter
    counter.update(bytes=0, documents=0)
    for doc in docs:
        text, data = doc.text, doc.text.encode()
        full = max_bytes is not None and counter["bytes"] + len(data) >= max_bytes
        if full:  # the last document: cut it, never inside a character
            text = data[: max_bytes - counter["bytes"]].decode("utf-8", errors="ignore")
            data = text.encode()
        counter["bytes"] += len(data)
        counter["documents"] += 1
        yield text
        if full:
            return
