"""Llama 3's byte-level BPE tokenizer on tiktoken: load/save the rank file, encode, decode.

A rank file (Meta's ``tokenizer.model``) has one line per BPE token, ``<base64 bytes> <rank>``, ranks
0..n-1. The 256 special tokens of Llama 3 follow the ranks, so Meta's 128,000 ranks give 128,256 ids;
a smaller vocabulary trained by this project gets the same specials right after its own ranks.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import AbstractSet, Literal

import tiktoken

from llamaherd.errors import HerdError

# Meta's pre-split regex, exact
PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_SPECIAL_TOKENS = 256
_NAMED_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",  # end of message (a tool call awaits its result)
    "<|eot_id|>",  # end of turn
    "<|python_tag|>",
    "<|image|>",
]
SPECIAL_TOKENS: list[str] = _NAMED_SPECIALS + [
    f"<|reserved_special_token_{i}|>" for i in range(2, 2 + NUM_SPECIAL_TOKENS - len(_NAMED_SPECIALS))
]

# tiktoken handles at most this many characters per call without a panic, and runs of more than
# MAX_RUN_CHARS whitespace or non-whitespace characters get slow (openai/tiktoken#195); Meta cuts
# the text the same way, so ids stay identical to theirs.
MAX_ENCODE_CHARS = 400_000
MAX_RUN_CHARS = 25_000
# Python's \s is exactly str.isspace(), which Meta's cutter uses
_SPACE_RUN, _OTHER_RUN = re.compile(r"\s*"), re.compile(r"\S*")


def load_ranks(path: str | Path) -> dict[bytes, int]:
    """Read a tiktoken rank file; every problem is a HerdError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise HerdError(f"{path}: tokenizer file not found (expected a tiktoken rank file like tokenizer.model)")
    ranks: dict[bytes, int] = {}
    line_of: dict[int, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split()
            try:
                if len(parts) != 2:
                    raise ValueError
                token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
            except (ValueError, binascii.Error):
                text = line.decode("utf-8", "replace").strip()[:60]
                raise HerdError(f"{path}:{lineno}: malformed line {text!r} "
                                "(expected '<base64 token> <rank>')") from None
            if token in ranks:
                raise HerdError(f"{path}:{lineno}: token {token!r} already has rank {ranks[token]}")
            if rank in line_of:
                raise HerdError(f"{path}:{lineno}: rank {rank} already used on line {line_of[rank]}")
            ranks[token], line_of[rank] = rank, lineno
    if not ranks:
        raise HerdError(f"{path}: empty tokenizer file (expected lines '<base64 token> <rank>')")
    return ranks


def _check_ranks(ranks: dict[bytes, int], where: str) -> None:
    """Ranks must be 0..n-1 and every single byte must be a token (byte-level BPE)."""
    n = len(ranks)
    if set(ranks.values()) != set(range(n)):
        missing = min(set(range(n)) - set(ranks.values()), default=n)
        raise HerdError(f"{where}: ranks must be 0..{n - 1} with no gaps; rank {missing} is missing")
    missing_bytes = [b for b in range(256) if bytes([b]) not in ranks]
    if missing_bytes:
        raise HerdError(f"{where}: byte 0x{missing_bytes[0]:02x} has no token (all 256 single bytes must have one)")


def _long_runs(s: str) -> Iterator[tuple[int, int]]:
    """``(start, end)`` of each run of more than MAX_RUN_CHARS whitespace (or non-whitespace) characters.

    Such a run covers a multiple of MAX_RUN_CHARS, so only the runs through those positions are measured.
    """
    n, end = len(s), 0
    if n <= MAX_RUN_CHARS:
        return
    reverse = s[::-1]
    for i in range(0, n, MAX_RUN_CHARS):
        if i < end:  # still inside the run measured last
            continue
        run = _SPACE_RUN if s[i].isspace() else _OTHER_RUN
        start = n - run.match(reverse, n - 1 - i).end()  # the run through i reaches back to here
        end = run.match(s, i).end()  # and on to here
        if end - start > MAX_RUN_CHARS:
            yield start, end


class Tokenizer:
    """Llama 3 tokenizer: tiktoken BPE ranks plus the 256 Llama 3 special tokens after them."""

    pat_str = PAT_STR

    def __init__(self, mergeable_ranks: dict[bytes, int], name: str = "mergeable_ranks"):
        _check_ranks(mergeable_ranks, name)
        self.mergeable_ranks: dict[bytes, int] = dict(mergeable_ranks)
        n = len(mergeable_ranks)
        self.special_tokens: dict[str, int] = {tok: n + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self.model = tiktoken.Encoding(
            name=name, pat_str=PAT_STR, mergeable_ranks=self.mergeable_ranks, special_tokens=self.special_tokens
        )
        self.n_words: int = n + NUM_SPECIAL_TOKENS
        self.bos_id: int = self.special_tokens["<|begin_of_text|>"]
        self.eos_id: int = self.special_tokens["<|end_of_text|>"]
        self.eot_id: int = self.special_tokens["<|eot_id|>"]
        self.eom_id: int = self.special_tokens["<|eom_id|>"]
        self.python_tag_id: int = self.special_tokens["<|python_tag|>"]
        self.pad_id: int = self.special_tokens["<|finetune_right_pad_id|>"]
        self.stop_tokens: list[int] = [self.eos_id, self.eom_id, self.eot_id]

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Load a tiktoken rank file such as Meta's ``tokenizer.model``."""
        return cls(load_ranks(path), name=str(path))

    @classmethod
    def from_ranks(cls, mergeable_ranks: dict[bytes, int]) -> Tokenizer:
        """Build from ``{token bytes: rank}``, e.g. the output of BPE training."""
        return cls(mergeable_ranks)

    def save(self, path: str | Path) -> None:
        """Write the ranks in the file format ``from_file`` reads (byte-identical for Meta's file)."""
        lines = (f"{base64.b64encode(tok).decode()} {rank}\n" for tok, rank in self._by_rank())
        Path(path).write_text("".join(lines), encoding="ascii")

    def _by_rank(self) -> list[tuple[bytes, int]]:
        return sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1])

    def encode(
        self,
        s: str,
        *,
        bos: bool = False,
        eos: bool = False,
        allowed_special: Literal["all"] | AbstractSet[str] = frozenset(),
    ) -> list[int]:
        """Text to ids. Special-token strings in ``s`` are plain text unless named in ``allowed_special``."""
        if not isinstance(s, str):
            raise HerdError(f"encode: expected text (str), got {type(s).__name__}")
        if allowed_special != "all" and not set(allowed_special) <= self.special_tokens.keys():
            unknown = sorted(set(allowed_special) - self.special_tokens.keys())[0]
            raise HerdError(f"encode: allowed_special {unknown!r} is not a special token of this tokenizer")
        ids = [self.bos_id] if bos else []
        for piece in self._pieces(s):
            if allowed_special:
                ids += self.model.encode(piece, allowed_special=allowed_special, disallowed_special=())
            else:
                ids += self.model.encode_ordinary(piece)
        if eos:
            ids.append(self.eos_id)
        return ids

    def encode_batch(
        self,
        texts: Iterable[str],
        *,
        bos: bool = False,
        eos: bool = False,
        allowed_special: Literal["all"] | AbstractSet[str] = frozenset(),
        num_threads: int = 8,
    ) -> list[list[int]]:
        """``encode`` many texts on ``num_threads`` threads (tiktoken releases the GIL)."""
        fn = partial(self.encode, bos=bos, eos=eos, allowed_special=allowed_special)
        with ThreadPoolExecutor(max(1, num_threads)) as pool:
            return list(pool.map(fn, texts))

    @staticmethod
    def _pieces(s: str) -> Iterator[str]:
        """Cut ``s`` as Meta does: 400K-character chunks, then runs of one kind longer than 25K chars."""
        for start in range(0, len(s), MAX_ENCODE_CHARS):
            chunk = s[start : start + MAX_ENCODE_CHARS]
            cuts = [0]
            for run_start, run_end in _long_runs(chunk):
                cuts += range(run_start + MAX_RUN_CHARS, run_end, MAX_RUN_CHARS)
            cuts.append(len(chunk))
            yield from (chunk[a:b] for a, b in zip(cuts, cuts[1:]))

    def decode(self, ids: Sequence[int]) -> str:
        """Ids to text; bytes that do not form valid UTF-8 (a cut character) decode as U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """Ids to raw bytes (for streaming output that may stop inside a character)."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        if ids and (min(ids) < 0 or max(ids) >= self.n_words):
            bad = next(i for i in ids if not 0 <= i < self.n_words)
            raise HerdError(f"decode: token id {bad} is out of range (expected 0..{self.n_words - 1})")
        return self.model.decode_bytes(ids)

    def __repr__(self) -> str:
        return f"Tokenizer(n_words={self.n_words})"
