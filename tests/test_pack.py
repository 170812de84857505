"""Packing documents into token shards, and opening them again (llamaherd.data.pack)."""

import argparse
import json

import numpy as np
import pytest
import tiktoken

from llamaherd.data import cli
from llamaherd.data.pack import PackedDataset, pack_documents, token_dtype
from llamaherd.errors import HerdError


class ByteTokenizer:
    """A tokenizer-like stub: tiktoken over the 256 byte tokens, then bos and eos at the top of the vocab."""

    def __init__(self, n_words=258):
        self.enc = tiktoken.Encoding(
            name="bytes", pat_str=r"\S+|\s+", mergeable_ranks={bytes([i]): i for i in range(256)}, special_tokens={}
        )
        self.n_words, self.bos_id, self.eos_id = n_words, n_words - 2, n_words - 1

    def encode_batch(self, texts, bos, eos, num_threads=8):
        ids = self.enc.encode_ordinary_batch(texts, num_threads=num_threads)
        return [[self.bos_id] * bos + t + [self.eos_id] * eos for t in ids]

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8")


class EncodeOnly:  # only `encode`, no `encode_batch`
    def __init__(self):
        self.inner = ByteTokenizer()
        self.n_words, self.bos_id, self.eos_id = 258, 256, 257

    def encode(self, text, bos, eos):
        return self.inner.encode_batch([text], bos, eos)[0]


def corpus(n=200, seed=0):
    rng = np.random.default_rng(seed)
    words = ["llama", "herd", "ünïcode", "日本語", "token", "\n", "a", "pack", "  "]
    return [" ".join(rng.choice(words, size=rng.integers(0, 60))) for _ in range(n)]


def files(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_round_trip_through_document_spans(tmp_path):
    texts = ["", "hello world", "ünïcode 日本語 🦙"] + corpus(50)
    tok = ByteTokenizer()
    stats = pack_documents(texts, tok, tmp_path / "ds", progress=False)
    ds = PackedDataset(tmp_path / "ds")
    assert (stats.n_docs, ds.n_docs, len(ds)) == (len(texts),) * 3
    assert stats.n_tokens == ds.n_tokens == sum(len(t.encode()) + 2 for t in texts)
    assert ds.vocab_size == 258 and ds.dtype == np.uint16 and (ds.bos_id, ds.eos_id) == (256, 257)
    for i, text in enumerate(texts):
        d = ds.doc(i)
        assert d[0] == tok.bos_id and d[-1] == tok.eos_id and tok.decode(d) == text
        assert not d.flags.writeable  # a read-only view of the memmap
    # gather: arbitrary pieces of documents, back to back
    docs, starts, lengths = [3, 0, 3], [1, 0, 0], [4, 2, 5]
    want = np.concatenate([ds.doc(d)[s : s + n] for d, s, n in zip(docs, starts, lengths)])
    assert np.array_equal(ds.gather(docs, starts, lengths), want)
    # Document objects (anything with .text) pack like their texts; so does an encode-only tokenizer
    docs = [type("Doc", (), {"text": t})() for t in texts]
    pack_documents(docs, EncodeOnly(), tmp_path / "objs", num_threads=2, progress=False)
    assert files(tmp_path / "objs") == files(tmp_path / "ds")


def test_dtype_follows_vocab_size(tmp_path):
    assert token_dtype(258) == token_dtype(65536) == "uint16" and token_dtype(65537) == "uint32"
    texts = corpus(20)
    for n_words, dtype in [(258, np.uint16), (65536, np.uint16), (70000, np.uint32)]:
        tok = ByteTokenizer(n_words)
        pack_documents(texts, tok, tmp_path / str(n_words), progress=False)
        ds = PackedDataset(tmp_path / str(n_words))
        assert ds.dtype == dtype and ds.meta["dtype"] == np.dtype(dtype).name
        assert (tmp_path / str(n_words) / "shard_00000.bin").stat().st_size == ds.n_tokens * np.dtype(dtype).itemsize
        assert ds.doc(5)[0] == n_words - 2 and tok.decode(ds.doc(5)) == texts[5]


def test_same_bytes_whatever_the_thread_count(tmp_path):
    texts = corpus(300, seed=1)
    for threads in (1, 4):
        pack_documents(texts, ByteTokenizer(), tmp_path / str(threads), num_threads=threads, batch_docs=7,
                       shard_tokens=5000, progress=False)
    assert files(tmp_path / "1") == files(tmp_path / "4")
    assert len(PackedDataset(tmp_path / "1").shards) > 1


def test_small_shards_keep_documents_whole(tmp_path):
    texts = corpus(100, seed=2) + ["x" * 120] + corpus(10, seed=3)  # one document longer than a shard
    stats = pack_documents(texts, ByteTokenizer(), tmp_path, shard_tokens=100, batch_docs=16, progress=False)
    ds = PackedDataset(tmp_path)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert stats.n_shards == len(meta["shards"]) == len(ds.shards) > 5
    assert sum(s["n_tokens"] for s in meta["shards"]) == meta["n_tokens"] == stats.n_tokens
    assert sum(s["n_docs"] for s in meta["shards"]) == meta["n_docs"] == len(texts)
    for s in meta["shards"]:
        index = np.load(tmp_path / s["index"])
        assert index[0] == 0 and index[-1] == s["n_tokens"] and len(index) == s["n_docs"] + 1
        assert s["n_tokens"] <= 100 or s["n_docs"] == 1  # only a lone oversized document overflows
        shard = np.fromfile(tmp_path / s["file"], dtype="<u2")
        assert (shard[index[:-1]] == 256).all() and (shard[index[1:] - 1] == 257).all()  # whole documents
    assert [ByteTokenizer().decode(ds.doc(i)) for i in range(len(ds))] == texts
    assert np.array_equal(np.bincount(ds.doc_shard), [s["n_docs"] for s in meta["shards"]])


def test_interrupted_pack_leaves_no_dataset(tmp_path):
    def broken():
        yield from corpus(100)
        raise RuntimeError("disk on fire")

    out = tmp_path / "ds"
    with pytest.raises(RuntimeError, match="disk on fire"):
        pack_documents(broken(), ByteTokenizer(), out, shard_tokens=50, batch_docs=8, progress=False)
    assert list(out.iterdir()) == []  # no meta.json, no shard, no temporary folder
    with pytest.raises(HerdError, match="meta.json"):
        PackedDataset(out)

    with pytest.raises(HerdError, match="empty"):
        pack_documents(iter([]), ByteTokenizer(), out, progress=False)
    assert list(out.iterdir()) == []

    # a finished dataset is not replaced by accident, nor hurt by a failed overwrite
    pack_documents(["one", "two"], ByteTokenizer(), out, progress=False)
    before = files(out)
    with pytest.raises(HerdError, match="already holds"):
        pack_documents(["three"], ByteTokenizer(), out, progress=False)
    with pytest.raises(RuntimeError):
        pack_documents(broken(), ByteTokenizer(), out, overwrite=True, progress=False)
    assert files(out) == before
    pack_documents(["three"], ByteTokenizer(), out, overwrite=True, progress=False)
    assert PackedDataset(out).n_docs == 1


def test_bad_token_ids_are_refused(tmp_path):
    tok = ByteTokenizer()
    tok.n_words = 100  # bytes and bos/eos above it do not fit
    with pytest.raises(HerdError, match="outside its vocabulary of 100"):
        pack_documents(["hello"], tok, tmp_path, progress=False)
    assert not (tmp_path / "meta.json").exists()


def test_damaged_datasets_are_refused(tmp_path):
    with pytest.raises(HerdError, match="not found"):
        PackedDataset(tmp_path / "nope")
    pack_documents(corpus(40), ByteTokenizer(), tmp_path, shard_tokens=200, progress=False)
    PackedDataset(tmp_path)
    shard = tmp_path / "shard_00001.bin"
    data = shard.read_bytes()
    shard.write_bytes(data[:-2])
    with pytest.raises(HerdError, match=r"shard_00001.bin: truncated: \d+ bytes, expected \d+"):
        PackedDataset(tmp_path)
    shard.write_bytes(data)
    meta_path = tmp_path / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "dtype": "float32"}))
    with pytest.raises(HerdError, match="dtype 'float32'"):
        PackedDataset(tmp_path)
    meta_path.write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(HerdError, match="version"):
        PackedDataset(tmp_path)
    meta_path.write_text("{not json")
    with pytest.raises(HerdError, match="not valid JSON"):
        PackedDataset(tmp_path)
    meta_path.write_text(json.dumps(meta))
    (tmp_path / "shard_00000.idx.npy").unlink()
    with pytest.raises(HerdError, match="shard_00000.idx.npy: shard file missing"):
        PackedDataset(tmp_path)


def test_tokenizer_checksum_recorded_and_checked(tmp_path):
    tok_file = tmp_path / "tok.model"
    tok_file.write_bytes(b"ranks")
    pack_documents(["a b"], ByteTokenizer(), tmp_path / "ds", tokenizer_file=tok_file, progress=False)
    ds = PackedDataset(tmp_path / "ds")
    assert len(ds.meta["tokenizer_sha256"]) == 64
    ds.check_tokenizer(ByteTokenizer(), tok_file)
    with pytest.raises(HerdError, match="vocabulary of 258"):
        ds.check_tokenizer(ByteTokenizer(300))
    tok_file.write_bytes(b"other ranks")
    with pytest.raises(HerdError, match="different tokenizer file"):
        ds.check_tokenizer(ByteTokenizer(), tok_file)


def parser():
    ap = argparse.ArgumentParser(prog="herd")
    cli.register(ap.add_subparsers())
    return ap


def test_cli_help_and_inspect(tmp_path, capsys):
    for argv in (["data"], ["data", "pack"], ["data", "inspect"]):
        with pytest.raises(SystemExit) as e:
            parser().parse_args([*argv, "--help"])
        assert e.value.code == 0
    pack_documents(corpus(30), ByteTokenizer(), tmp_path, shard_tokens=300, progress=False)
    capsys.readouterr()
    args = parser().parse_args(["data", "inspect", str(tmp_path)])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    ds = PackedDataset(tmp_path)
    assert f"tokens      {ds.n_tokens:,}" in out and "uint16" in out and "shard_00001.bin" in out
    args = parser().parse_args(["data", "inspect", str(tmp_path / "missing")])
    with pytest.raises(HerdError, match="not found"):
        args.func(args)


def test_cli_pack(tmp_path):
    sources = pytest.importorskip("llamaherd.data.sources")
    Tokenizer = pytest.importorskip("llamaherd.tokenizer").Tokenizer
    Tokenizer.from_ranks({bytes([i]): i for i in range(256)}).save(tmp_path / "tok.model")
    (tmp_path / "in.txt").write_text("first document\n\nsecond document\n")
    argv = ["data", "pack", "--tokenizer", str(tmp_path / "tok.model"), "--input", str(tmp_path / "in.txt"),
            "--out", str(tmp_path / "out"), "--threads", "2", "--quiet"]
    args = parser().parse_args(argv)
    assert args.func(args) == 0
    ds = PackedDataset(tmp_path / "out")
    tok = Tokenizer.from_file(tmp_path / "tok.model")
    ds.check_tokenizer(tok, tmp_path / "tok.model")
    want = [d.text for d in sources.read_documents([str(tmp_path / "in.txt")])]
    assert [tok.decode(ds.doc(i)[1:-1]) for i in range(len(ds))] == want
    assert ds.doc(0)[0] == tok.bos_id and ds.doc(0)[-1] == tok.eos_id
