"""Tokenize documents and pack them into sharded token files that training reads with zero copies.

A packed dataset is a directory:

    meta.json              format version, dtype, vocab size, per-shard and total token/doc counts
    shard_00000.bin        the tokens of whole documents, back to back: flat little-endian uint16/uint32
    shard_00000.idx.npy    int64 start offset of each document within the shard, plus the end
    ...

Each document is stored as ``bos + tokens + eos``; a document never spans two shards. A pack writes
into a temporary folder inside the output directory and moves the files into place only when every
document has been written, ``meta.json`` last: a pack that is interrupted leaves no dataset that opens.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from llamaherd.errors import HerdError

FORMAT_VERSION = 1
META_FILE = "meta.json"
DEFAULT_SHARD_TOKENS = 1 << 28  # 256M tokens: 512 MB of uint16 per shard
DEFAULT_BATCH_DOCS = 4096  # documents handed to the tokenizer at once
_BATCH_CHARS = 16 << 20  # ...or fewer, once their text passes 16M characters
_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


def token_dtype(n_words: int) -> str:
    """The smallest stored dtype that holds every token id of a vocabulary of ``n_words``."""
    return "uint16" if n_words <= 1 << 16 else "uint32"


def shard_names(i: int) -> tuple[str, str]:
    return f"shard_{i:05d}.bin", f"shard_{i:05d}.idx.npy"


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class PackStats:
    out_dir: str
    n_docs: int
    n_tokens: int
    n_shards: int
    dtype: str
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.n_tokens / max(self.seconds, 1e-9)


class _ShardWriter:
    """Appends batches of whole documents to shard files in ``tmp``, starting a new shard when full."""

    def __init__(self, tmp: Path, dtype: np.dtype, shard_tokens: int):
        self.tmp, self.dtype, self.shard_tokens = tmp, dtype, shard_tokens
        self.shards: list[dict] = []  # finished shards, as recorded in meta.json
        self._file = None
        self._lengths: list[np.ndarray] = []
        self._n = 0  # tokens in the open shard

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Write documents given as their concatenated ``tokens`` and their ``lengths``."""
        ends = np.cumsum(lengths)
        i = 0  # first document not yet written
        while i < len(lengths):
            done = ends[i - 1] if i else 0
            # how many of the next documents fit in what is left of the open shard
            k = int(np.searchsorted(ends, done + self.shard_tokens - self._n, side="right")) - i
            if k <= 0 and self._n:  # the next document does not fit: close this shard
                self._close()
                continue
            k = max(k, 1)  # a document longer than a whole shard gets a shard of its own
            if self._file is None:
                self._file = open(self.tmp / shard_names(len(self.shards))[0], "wb")
            self._file.write(tokens[done : ends[i + k - 1]].astype(self.dtype, copy=False).tobytes())
            self._lengths.append(lengths[i : i + k])
            self._n += int(ends[i + k - 1] - done)
            i += k

    def _close(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        lengths = np.concatenate(self._lengths)
        index = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        bin_name, idx_name = shard_names(len(self.shards))
        with open(self.tmp / idx_name, "wb") as f:
            np.save(f, index)
        self.shards.append({"file": bin_name, "index": idx_name, "n_tokens": self._n, "n_docs": len(lengths)})
        self._lengths, self._n = [], 0

    def finish(self) -> list[dict]:
        if self._file is not None:
            self._close()
        return self.shards

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()


def _text_batches(texts: Iterable, batch_docs: int) -> Iterator[list[str]]:
    batch, chars = [], 0
    for t in texts:
        t = t if isinstance(t, str) else t.text  # a Document, or anything with .text
        batch.append(t)
        chars += len(t)
        if len(batch) >= batch_docs or chars >= _BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _encode(tokenizer, texts: list[str], num_threads: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize ``texts`` as ``bos + tokens + eos`` each; return all tokens back to back, and lengths."""
    if hasattr(tokenizer, "encode_batch"):
        ids = tokenizer.encode_batch(texts, bos=True, eos=True, num_threads=num_threads)
    else:
        with ThreadPoolExecutor(num_threads) as pool:
            ids = list(pool.map(lambda t: tokenizer.encode(t, bos=True, eos=True), texts))
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
    return tokens, lengths


def pack_documents(
    texts: Iterable,
    tokenizer,
    out_dir: str | os.PathLike,
    *,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    num_threads: int | None = None,
    batch_docs: int = DEFAULT_BATCH_DOCS,
    tokenizer_file: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> PackStats:
    """Tokenize ``texts`` (strings, or documents with a ``.text``) and pack them into ``out_dir``.

    ``tokenizer`` is anything with ``encode_batch(texts, bos=, eos=, num_threads=)`` (or ``encode``),
    ``n_words``, ``bos_id`` and ``eos_id``. Batches of ``batch_docs`` documents are tokenized on
    ``num_threads`` threads while the next batch is read; document order is the input order whatever
    the thread count, so the output is byte-identical. A shard holds at most ``shard_tokens`` tokens,
    unless one document alone is longer. ``tokenizer_file``, when given, is checksummed into meta.json.
    """
    t0 = time.perf_counter()
    out = Path(out_dir)
    if shard_tokens < 1:
        raise HerdError(f"shard_tokens must be at least 1, got {shard_tokens}")
    if out.exists() and not out.is_dir():
        raise HerdError(f"{out}: exists and is not a directory")
    if (out / META_FILE).exists() and not overwrite:
        raise HerdError(f"{out}: already holds a packed dataset; choose another output directory or overwrite it")
    n_words = int(tokenizer.n_words)
    dtype_name = token_dtype(n_words)
    num_threads = num_threads or os.cpu_count() or 1
    tok_sha = file_sha256(tokenizer_file) if tokenizer_file is not None else None
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".pack-tmp-", dir=out))
    writer = _ShardWriter(tmp, _DTYPES[dtype_name], shard_tokens)
    n_docs = n_tokens = 0
    last_report = t0
    try:
        with ThreadPoolExecutor(1) as pool:  # tokenizes one batch while the main thread reads the next

            def write(done) -> None:
                nonlocal n_docs, n_tokens, last_report
                tokens, lengths = done.result()
                if len(tokens) and (tokens.min() < 0 or tokens.max() >= n_words):
                    bad = tokens[(tokens < 0) | (tokens >= n_words)][0]
                    raise HerdError(f"tokenizer produced token id {bad}, outside its vocabulary of {n_words}")
                writer.add(tokens, lengths)
                n_docs += len(lengths)
                n_tokens += len(tokens)
                if progress and time.perf_counter() - last_report > 10:
                    last_report = time.perf_counter()
                    rate = n_tokens / (last_report - t0)
                    print(f"packed {n_docs:,} docs, {n_tokens:,} tokens ({rate:,.0f} tok/s)", file=sys.stderr)

            pending = None
            for batch in _text_batches(texts, batch_docs):
                job = pool.submit(_encode, tokenizer, batch, num_threads)
                if pending is not None:
                    write(pending)
                pending = job
            if pending is not None:
                write(pending)
        if n_docs == 0:
            raise HerdError("no documents to pack: the input is empty")
        shards = writer.finish()
        meta = {
            "format": "llamaherd-packed",
            "version": FORMAT_VERSION,
            "dtype": dtype_name,
            "vocab_size": n_words,
            "bos_id": int(tokenizer.bos_id),
            "eos_id": int(tokenizer.eos_id),
            "n_tokens": n_tokens,
            "n_docs": n_docs,
            "tokenizer_sha256": tok_sha,
            "shards": shards,
        }
        with open(tmp / META_FILE, "w") as f:
            json.dump(meta, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        _install(tmp, out, [n for s in shards for n in (s["file"], s["index"])])
    finally:
        writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
    stats = PackStats(str(out), n_docs, n_tokens, len(shards), dtype_name, time.perf_counter() - t0)
    if progress:
        print(
            f"packed {n_docs:,} docs, {n_tokens:,} tokens into {len(shards)} shard(s) in {out} "
            f"({stats.tokens_per_second:,.0f} tok/s)",
            file=sys.stderr,
        )
    return stats


def _install(tmp: Path, out: Path, names: list[str]) -> None:
    """Move a finished pack from ``tmp`` into ``out``; an older dataset there is unmade first."""
    (out / META_FILE).unlink(missing_ok=True)  # from here until the end, ``out`` holds no dataset that opens
    for old in itertools.chain(out.glob("shard_*.bin"), out.glob("shard_*.idx.npy")):
        old.unlink()
    for name in names:
        os.replace(tmp / name, out / name)
    os.replace(tmp / META_FILE, out / META_FILE)


class PackedDataset:
    """A packed dataset opened read-only: shards are ``np.memmap`` views, nothing is copied.

    Documents are numbered 0..n_docs-1 across shards in pack order. ``doc_shard``, ``doc_start`` and
    ``doc_len`` give every document's shard, start offset within that shard, and length in tokens.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise HerdError(f"{self.path}: packed dataset directory not found")
        meta_path = self.path / META_FILE
        if not meta_path.is_file():
            raise HerdError(f"{meta_path}: not found; not a packed dataset (or its pack was interrupted)")
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise HerdError(f"{meta_path}: not valid JSON ({e})") from None
        version = meta.get("version") if isinstance(meta, dict) else None
        if version != FORMAT_VERSION:
            raise HerdError(f"{meta_path}: expected packed format version {FORMAT_VERSION}, got {version!r}")
        try:
            self._open(meta, meta_path)
        except (KeyError, TypeError) as e:
            raise HerdError(f"{meta_path}: malformed metadata ({type(e).__name__}: {e})") from None

    def _open(self, meta: dict, meta_path: Path) -> None:
        self.meta = meta
        if meta["dtype"] not in _DTYPES:
            raise HerdError(f"{meta_path}: dtype {meta['dtype']!r} is not one of {sorted(_DTYPES)}")
        self.dtype = _DTYPES[meta["dtype"]]
        self.vocab_size = int(meta["vocab_size"])
        if self.vocab_size > np.iinfo(self.dtype).max + 1:
            raise HerdError(f"{meta_path}: vocab_size {self.vocab_size} does not fit dtype {meta['dtype']}")
        self.bos_id, self.eos_id = meta.get("bos_id"), meta.get("eos_id")
        self.n_tokens, self.n_docs = int(meta["n_tokens"]), int(meta["n_docs"])
        self.shards: list[np.ndarray] = []
        starts, shard_of = [], []
        for i, s in enumerate(meta["shards"]):
            bin_path, idx_path = self.path / s["file"], self.path / s["index"]
            n = int(s["n_tokens"])
            if not bin_path.is_file() or not idx_path.is_file():
                missing = bin_path if not bin_path.is_file() else idx_path
                raise HerdError(f"{missing}: shard file missing")
            size, expected = bin_path.stat().st_size, n * self.dtype.itemsize
            if size != expected:
                what = "truncated" if size < expected else "larger than recorded"
                raise HerdError(f"{bin_path}: {what}: {size} bytes, expected {expected} ({n} {meta['dtype']} tokens)")
            index = np.load(idx_path, mmap_mode="r")
            if (
                index.dtype != np.int64
                or index.shape != (int(s["n_docs"]) + 1,)
                or index[0] != 0
                or index[-1] != n
                or np.any(np.diff(index) <= 0)
            ):
                raise HerdError(f"{idx_path}: document index does not match {s['n_docs']} documents of {n} tokens")
            self.shards.append(np.memmap(bin_path, dtype=self.dtype, mode="r").view(np.ndarray))
            starts.append(np.asarray(index))
            shard_of.append(np.full(len(index) - 1, i, dtype=np.int32))
        if sum(len(s) for s in self.shards) != self.n_tokens or sum(len(s) - 1 for s in starts) != self.n_docs:
            raise HerdError(f"{self.path / META_FILE}: shard totals do not add up to n_tokens/n_docs")
        self.doc_shard = np.concatenate(shard_of) if shard_of else np.zeros(0, np.int32)
        self.doc_start = np.concatenate([s[:-1] for s in starts]) if starts else np.zeros(0, np.int64)
        self.doc_len = np.concatenate([np.diff(s) for s in starts]) if starts else np.zeros(0, np.int64)

    def __len__(self) -> int:
        return self.n_docs

    def __repr__(self) -> str:
        return (
            f"PackedDataset({str(self.path)!r}, docs={self.n_docs}, tokens={self.n_tokens}, "
            f"dtype={self.dtype.name}, shards={len(self.shards)})"
        )

    def doc(self, i: int) -> np.ndarray:
        """The tokens of document ``i`` (bos..eos): a read-only view into its shard."""
        if not -self.n_docs <= i < self.n_docs:
            raise IndexError(f"document {i} out of range for {self.n_docs} documents")
        start = self.doc_start[i]
        return self.shards[self.doc_shard[i]][start : start + self.doc_len[i]]

    def gather(self, docs: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Tokens ``[starts[k], starts[k] + lengths[k])`` of document ``docs[k]``, for every k, back to back.

        Offsets count from each document's first token. Returns one int64 array; no Python loop per token
        or per document (only one per shard involved).
        """
        docs, starts, lengths = np.asarray(docs), np.asarray(starts, np.int64), np.asarray(lengths, np.int64)
        n = int(lengths.sum())
        dest = np.cumsum(lengths) - lengths  # where each piece begins in the output
        src = np.repeat(self.doc_start[docs] + starts - dest, lengths) + np.arange(n)
        shard_of = self.doc_shard[docs]
        used = np.unique(shard_of)
        if len(used) == 1:
            return self.shards[used[0]][src].astype(np.int64)
        out = np.empty(n, np.int64)
        shard = np.repeat(shard_of, lengths)
        for s in used:
            m = shard == s
            out[m] = self.shards[s][src[m]]
        return out

    def check_tokenizer(self, tokenizer, tokenizer_file: str | os.PathLike | None = None) -> None:
        """Raise HerdError unless ``tokenizer`` (and its file, when both checksums are known) packed this data."""
        if int(tokenizer.n_words) != self.vocab_size:
            raise HerdError(
                f"{self.path}: packed with a vocabulary of {self.vocab_size}, but the tokenizer has {tokenizer.n_words}"
            )
        recorded = self.meta.get("tokenizer_sha256")
        if tokenizer_file is not None and recorded and file_sha256(tokenizer_file) != recorded:
            raise HerdError(f"{self.path}: packed with a different tokenizer file than {tokenizer_file}")
