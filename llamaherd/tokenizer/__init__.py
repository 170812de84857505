"""Llama 3 tokenizer: tiktoken BPE with the 256 Llama 3 special tokens, the chat format, and
Hugging Face tokenizer files.

    >>> tok = Tokenizer.from_file("tokenizer.model")
    >>> tok.encode("Hello, world!", bos=True)
    [128000, 9906, 11, 1917, 0]
"""

from __future__ import annotations

from pathlib import Path

from llamaherd.errors import HerdError
from llamaherd.tokenizer.chat import ROLES, ChatFormat
from llamaherd.tokenizer.tiktoken_bpe import PAT_STR, SPECIAL_TOKENS, Tokenizer, load_ranks

__all__ = ["Tokenizer", "ChatFormat", "load_tokenizer", "load_ranks", "PAT_STR", "SPECIAL_TOKENS", "ROLES"]


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A tiktoken rank file, a Hugging Face tokenizer.json, or a directory holding either
    (``tokenizer.model``, ``original/tokenizer.model`` or ``tokenizer.json``, looked for in that order)."""
    path = Path(path)
    if path.is_dir():
        found = [p for p in ("tokenizer.model", "original/tokenizer.model", "tokenizer.json") if (path / p).is_file()]
        if not found:
            raise HerdError(f"{path}: no tokenizer.model or tokenizer.json in this directory")
        path = path / found[0]
    if path.suffix == ".json":
        from llamaherd.tokenizer.hf import read_hf_tokenizer

        return read_hf_tokenizer(path)
    return Tokenizer.from_file(path)
