"""BPE training: ranks in tiktoken's layout, loadable by tiktoken and our Tokenizer, exact round trips."""

import base64
import json

import pytest
import regex
import tiktoken
from tiktoken.load import load_tiktoken_bpe
from tokenizers import pre_tokenizers

from llamaherd.cli import build_parser
from llamaherd.data.sources import Document
from llamaherd.data.stdlib_corpus import stdlib_documents
from llamaherd.errors import HerdError
from llamaherd.tokenizer import Tokenizer
from llamaherd.tokenizer.train import (
    byte_decoder,
    capped_texts,
    pre_tokenizer,
    save_ranks,
    train_bpe,
)

# Meta's Llama 3 pre-split regex, written out here so the test pins it independently
LLAMA3_PAT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
VOCAB = 4096
SAMPLES = [
    "def f(x):\n    return {'a': x ** 2}  # comment\r\n\n\n\tindented\t\ttabs   trailing   \n",
    "Ünïcödé naïve café, 日本語のテキスト, Ελληνικά, עברית, русский текст.",
    "emoji 😀🦙👩‍👩‍👧‍👦, flag 🇫🇷; math ∑∫√ — “quotes” it's they'll I'M 12345678 3.14",
    "   leading spaces and \x00 control \x1b[0m bytes \u2028 separators\u00a0nbsp",
]


@pytest.fixture(scope="module")
def ranks():
    return train_bpe((d.text for d in stdlib_documents("train", max_bytes=1_500_000)), VOCAB, progress=False)


@pytest.fixture(scope="module")
def model_file(ranks, tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    save_ranks(ranks, path)
    return path


def test_exactly_vocab_size_ranks_with_single_bytes_first(ranks):
    assert len(ranks) == VOCAB and sorted(ranks.values()) == list(range(VOCAB))
    assert all(ranks[bytes([b])] == b for b in range(256))


def test_every_merged_token_comes_from_two_lower_ranked_tokens(ranks):
    for token, rank in ranks.items():
        if rank >= 256:
            splits = [(token[:i], token[i:]) for i in range(1, len(token))]
            assert any(ranks.get(a, VOCAB) < rank and ranks.get(b, VOCAB) < rank for a, b in splits), token


def test_training_is_deterministic(ranks):
    texts = [d.text for d in stdlib_documents("train", max_bytes=300_000)]
    first, second = train_bpe(texts, 1024, progress=False), train_bpe(texts, 1024, progress=False)
    assert list(first.items()) == list(second.items())


def test_file_loads_in_tiktoken_and_round_trips_exactly(ranks, model_file):
    assert load_tiktoken_bpe(str(model_file)) == ranks
    lines = model_file.read_text().splitlines()
    assert lines[65] == f"{base64.b64encode(b'A').decode()} 65" and len(lines) == VOCAB
    enc = tiktoken.Encoding("trained", pat_str=LLAMA3_PAT, mergeable_ranks=ranks, special_tokens={})
    for text in SAMPLES + [d.text for d in stdlib_documents("val", max_bytes=100_000)]:
        assert enc.decode(enc.encode_ordinary(text)) == text


def test_file_loads_as_llamaherd_tokenizer(model_file):
    tok = Tokenizer.from_file(model_file)
    assert tok.n_words == VOCAB + 256
    for text in SAMPLES:
        ids = tok.encode(text, bos=True, eos=True)
        assert ids[0] == tok.bos_id == VOCAB and ids[-1] == tok.eos_id
        assert tok.decode(ids[1:-1]) == text


def test_compression_on_held_out_code_and_prose(ranks):
    enc = tiktoken.Encoding("trained", pat_str=LLAMA3_PAT, mergeable_ranks=ranks, special_tokens={})
    val = list(stdlib_documents("val", max_bytes=400_000))
    for kind, limit in (("stdlib:code", 0.4), ("stdlib:prose", 0.4)):
        texts = [d.text for d in val if d.source == kind]
        n_bytes = sum(len(t.encode()) for t in texts)
        assert n_bytes > 10_000
        assert sum(len(enc.encode_ordinary(t)) for t in texts) / n_bytes < limit, kind


def test_pre_tokenization_matches_tiktoken_regex():
    to_byte = byte_decoder()
    assert set(to_byte) == set(pre_tokenizers.ByteLevel.alphabet()) and sorted(to_byte.values()) == list(range(256))
    split = pre_tokenizer()
    for text in SAMPLES:
        pieces = [bytes(to_byte[c] for c in piece) for piece, _ in split.pre_tokenize_str(text)]
        assert pieces == [p.encode() for p in regex.findall(LLAMA3_PAT, text)]


def test_small_corpus_runs_out_of_merges():
    ranks = train_bpe(["abab abab abab"], vocab_size=1000, progress=False)
    assert 256 < len(ranks) < 1000 and b"ab" in ranks
    assert len(train_bpe(["abab"], vocab_size=1000, min_frequency=3, progress=False)) == 256  # "ab" seen twice
    with pytest.raises(HerdError, match="vocab_size 100"):
        train_bpe(["x"], vocab_size=100)


def test_capped_texts_cut_at_a_character_boundary():
    docs = [Document(str(i), t, "mem") for i, t in enumerate(["aaaa", "bé😀b", "never read"])]
    counter = {}
    assert list(capped_texts(docs, 7, counter)) == ["aaaa", "bé"]
    assert counter == {"bytes": 7, "documents": 2}
    assert list(capped_texts(docs[:2], None)) == ["aaaa", "bé😀b"]


def test_tokenizer_train_cli(tmp_path, capsys):
    data = tmp_path / "corpus.jsonl"
    texts = [d.text for d in stdlib_documents("train", max_bytes=200_000)]
    data.write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    out = tmp_path / "out" / "tok.model"
    args = build_parser().parse_args(
        ["tokenizer", "train", "--input", str(data), "--vocab-size", "600", "--out", str(out), "--text-field", "body",
         "--max-bytes", "100000"]
    )  # fmt: skip
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert printed.count("\n") == 1 and "600 ranks from 0.10 MB" in printed and "MB/s" in printed
    assert Tokenizer.from_file(out).n_words == 600 + 256
    assert [p.name for p in out.parent.iterdir()] == ["tok.model"]
