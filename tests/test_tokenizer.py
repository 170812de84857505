"""The Llama 3 tokenizer against Meta's reference: same ids on the same file, same chat format."""

from __future__ import annotations

import argparse
import base64
import importlib.resources
import random

import pytest

from llamaherd.errors import HerdError
from llamaherd.tokenizer import ChatFormat, Tokenizer, load_tokenizer
from llamaherd.tokenizer import cli as tokenizer_cli

pytest.importorskip("llama_models")
from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer  # noqa: E402

META_MODEL = importlib.resources.files("llama_models.llama3") / "tokenizer.model"

TEXTS = {
    "english": "The quick brown fox jumps over the lazy dog. It's 3:45pm; we'll see—won't we? I'd say \"yes\" (99.5%)!",
    "python": 'def fib(n: int) -> int:\n\t"""Fibonacci."""\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n\n\nprint([fib(i) for i in range(10)])  # 0..34\n',  # noqa: E501
    "c": "#include <stdio.h>\nint main(void) {\r\n    for (int i = 0; i < 10; ++i) printf(\"%d\\n\", i * i);\r\n    return 0;\r\n}\n",  # noqa: E501
    "chinese": "我们的目标是构建一个开放的人工智能系统。北京的秋天很美，天空湛蓝。",
    "japanese": "吾輩は猫である。名前はまだ無い。東京タワーは１９５８年に完成しました。",
    "korean": "대한민국의 수도는 서울입니다. 오늘 날씨가 정말 좋네요!",
    "arabic": "اللغة العربية هي إحدى أكثر اللغات انتشاراً في العالم، ويتحدثها أكثر من ٤٠٠ مليون نسمة.",
    "hindi": "भारत एक विशाल देश है। हिन्दी भारत की राजभाषा है और करोड़ों लोग इसे बोलते हैं।",
    "russian": "Съешь же ещё этих мягких французских булок, да выпей чаю. Москва — столица России.",
    "greek": "Ξεσκεπάζω την ψυχοφθόρα βδελυγμία. Η Αθήνα είναι η πρωτεύουσα της Ελλάδας.",
    "hebrew": "עברית היא שפה שמית. ירושלים היא עיר עתיקה מאוד, בת יותר מ־3000 שנה.",
    "thai": "ภาษาไทยเป็นภาษาที่มีวรรณยุกต์ กรุงเทพมหานครเป็นเมืองหลวงของประเทศไทย",
    "german": "Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich. Straße, Größe, Fußgängerübergänge.",
    "french": "Voix ambiguë d'un cœur qui, au zéphyr, préfère les jattes de kiwis. L'été à Paris, c'est génial !",
    "vietnamese": "Tiếng Việt có sáu thanh điệu. Hà Nội là thủ đô của nước Cộng hòa Xã hội chủ nghĩa Việt Nam.",
    "turkish": "Pijamalı hasta yağız şoföre çabucak güvendi. İstanbul'da ılık bir akşam.",
    "emoji": "I ❤️ 🦙s! 👩‍💻 👨‍👩‍👧‍👦 🏳️‍🌈 🧑🏽‍🚀 ❤️‍🔥 👍🏿 🇯🇵🇫🇷 😀😃😄 ✨",
    "whitespace": "a \t\n\r\n  b\u00a0\u3000c\u2028d\x0b\x0c   \n\n\n\t\t  e   ",
    "contractions": "THEY'RE HERE, We'Ve, i'M, you'LL, he'D, don'T, it'S. 'twas",
    "numbers": "1 12 123 1234 12345 3.14159 1,000,000 0x1F ٣٤٥ ૧૨૩",
}


def _mixed_text(n_chars: int, seed: int = 0) -> str:
    """Deterministic text of about n_chars mixing every sample with random whitespace and symbols."""
    rng = random.Random(seed)
    parts, size, pool = [], 0, list(TEXTS.values())
    fillers = [" ", "\n", "\n\n", "\t", "  ", "\r\n", "!!", "…", "<|eot_id|>", "1234567", " " * 40]
    while size < n_chars:
        part = rng.choice(pool) if rng.random() < 0.7 else rng.choice(fillers) * rng.randint(1, 30)
        parts.append(part)
        size += len(part)
    return "".join(parts)


LONG_TEXTS = {
    "spaces_60k": " " * 60_000,
    "mixed_whitespace_60k": "start" + (" " * 9_000 + "\n" * 9_000 + "\t" * 9_000 + "\r\n" * 4_000) * 2 + "end",
    "unicode_whitespace_30k": "x" + "\u3000\u00a0\u2028\x1c\x85 " * 5_000 + "y",
    "letters_60k": "a" * 60_000,
    "cjk_30k": "字" * 30_000,
    "runs_across_chunk_edge": "w" * (400_000 - 10) + " " * 30_000 + "z" * 50_010,
    "mixed_1mb": _mixed_text(1_000_000),
}
ALL_TEXTS = {**TEXTS, **LONG_TEXTS}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_file(META_MODEL)


@pytest.fixture(scope="module")
def meta() -> MetaTokenizer:
    return MetaTokenizer(META_MODEL)


@pytest.mark.parametrize("name", list(ALL_TEXTS))
def test_same_ids_as_meta_and_round_trip(tok, meta, name):
    text = ALL_TEXTS[name]
    ids = tok.encode(text, bos=False, eos=False)
    assert ids == meta.encode(text, bos=False, eos=False)
    assert tok.decode(ids) == text


def _runs_text(seed: int) -> str:
    """Runs of whitespace and of other characters with lengths around the 25,000-character limit."""
    rng = random.Random(seed)
    lengths = [1, 7, 24_999, 25_000, 25_001, 49_999, 50_000, 50_001, 75_001, 120_000]
    parts, first = [], rng.randint(0, 1)
    for i in range(24):  # alternating kinds, so each run has exactly the length drawn
        chars = " \t\n\u3000\x1c" if i % 2 == first else "ab字🦙"
        length = rng.choice(lengths)
        parts.append(("".join(rng.choice(chars) for _ in range(8)) * (length // 8 + 1))[:length])
    return "".join(parts)


def test_cutting_matches_meta():
    """Our cutter cuts exactly where Meta's character loop does, chunk by chunk."""
    for text in [*LONG_TEXTS.values(), _runs_text(1), _runs_text(2)]:
        theirs = [
            piece
            for i in range(0, len(text), 400_000)
            for piece in MetaTokenizer._split_whitespaces_or_nonwhitespaces(text[i : i + 400_000], 25_000)
        ]
        assert list(Tokenizer._pieces(text)) == theirs


def test_bos_eos(tok, meta):
    for bos in (False, True):
        for eos in (False, True):
            ids = tok.encode("Hello", bos=bos, eos=eos)
            assert ids == meta.encode("Hello", bos=bos, eos=eos)
            assert (ids[0] == tok.bos_id) == bos and (ids[-1] == tok.eos_id) == eos
    assert tok.encode("", bos=True, eos=True) == [128000, 128001]
    assert tok.encode("") == []


def test_special_token_strings(tok, meta):
    text = "<|begin_of_text|>Hi<|eot_id|><|start_header_id|>x<|reserved_special_token_99|>"
    plain = tok.encode(text)
    assert plain == meta.encode(text, bos=False, eos=False)
    assert not set(plain) & set(tok.special_tokens.values())
    assert tok.decode(plain) == text
    special = tok.encode(text, allowed_special="all")
    assert special == meta.encode(text, bos=False, eos=False, allowed_special="all")
    assert special[:2] == [128000, 13347] and 128009 in special
    assert special[-1] == tok.special_tokens["<|reserved_special_token_99|>"]
    only_eot = tok.encode(text, allowed_special={"<|eot_id|>"})
    assert only_eot == meta.encode(text, bos=False, eos=False, allowed_special={"<|eot_id|>"})
    assert 128009 in only_eot and 128000 not in only_eot
    assert tok.decode(special) == text
    with pytest.raises(HerdError, match="not a special token"):
        tok.encode("x", allowed_special={"<|nope|>"})


def test_pinned_ids(tok):
    assert tok.encode("Hello, world!", bos=True) == [128000, 9906, 11, 1917, 0]
    assert tok.encode("The quick brown fox") == [791, 4062, 14198, 39935]
    assert tok.encode(" 12345 llamas!!") == [220, 4513, 1774, 9507, 29189, 3001]
    assert tok.encode("你好，世界") == [57668, 53901, 3922, 102616]


def test_vocabulary_and_special_ids(tok, meta):
    assert tok.n_words == 128_256 and len(tok.mergeable_ranks) == 128_000
    expected = {
        "<|begin_of_text|>": 128000, "<|end_of_text|>": 128001, "<|reserved_special_token_0|>": 128002,
        "<|reserved_special_token_1|>": 128003, "<|finetune_right_pad_id|>": 128004, "<|step_id|>": 128005,
        "<|start_header_id|>": 128006, "<|end_header_id|>": 128007, "<|eom_id|>": 128008, "<|eot_id|>": 128009,
        "<|python_tag|>": 128010, "<|image|>": 128011, "<|reserved_special_token_2|>": 128012,
        "<|reserved_special_token_245|>": 128255,
    }  # fmt: skip
    assert expected.items() <= tok.special_tokens.items() and len(tok.special_tokens) == 256
    assert tok.special_tokens == meta.special_tokens
    assert (tok.bos_id, tok.eos_id, tok.eot_id, tok.eom_id, tok.pad_id) == (128000, 128001, 128009, 128008, 128004)
    assert tok.stop_tokens == [128001, 128008, 128009]


def test_save_is_byte_identical(tok, tmp_path):
    tok.save(tmp_path / "tokenizer.model")
    assert (tmp_path / "tokenizer.model").read_bytes() == META_MODEL.read_bytes()
    assert load_tokenizer(tmp_path).mergeable_ranks == tok.mergeable_ranks


def _small_ranks() -> dict[bytes, int]:
    ranks = {bytes([b]): b for b in range(256)}
    for merged in (b"th", b"the", b" t", b" the", b"in", b"ing", b"ll", b"lla", b"llam", b"llama"):
        ranks.setdefault(merged, len(ranks))
    return ranks


def test_small_vocabulary(tmp_path):
    ranks = _small_ranks()
    small = Tokenizer.from_ranks(ranks)
    n = len(ranks)
    assert small.n_words == n + 256 and small.bos_id == n and small.eot_id == n + 9
    assert min(small.special_tokens.values()) == n and max(small.special_tokens.values()) == n + 255
    text = "the llama thing sings in the rain <|eot_id|> 🦙"
    ids = small.encode(text, bos=True)
    assert ids[:3] == [n, ranks[b"the"], ranks[b" "]] and ranks[b"llama"] in ids and ranks[b"ing"] in ids
    assert small.decode(ids[1:]) == text
    small.save(tmp_path / "small.model")
    again = Tokenizer.from_file(tmp_path / "small.model")
    assert again.mergeable_ranks == ranks and again.encode(text) == small.encode(text)


def _write(path, lines: list[str]) -> str:
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def _byte_lines(shift: int = 0) -> list[str]:
    return [f"{base64.b64encode(bytes([b])).decode()} {b + shift}" for b in range(256)]


@pytest.mark.parametrize(
    "lines, match",
    [
        ([], "empty tokenizer file"),
        (_byte_lines()[:5] + ["QUJD"] + _byte_lines()[5:], r":6: malformed line"),
        (_byte_lines()[:7] + ["QUJD seven"], r":8: malformed line"),
        (_byte_lines()[:3] + ["!!notbase64!! 3"], r":4: malformed line"),
        (_byte_lines() + ["QUJD 256 extra"], r":257: malformed line"),
        (_byte_lines() + ["QUJD 12"], r":257: rank 12 already used on line 13"),
        (_byte_lines() + ["QQ== 256"], r":257: token b'A' already has rank 65"),
        (_byte_lines() + ["QUJD 300"], r"ranks must be 0\.\.256 with no gaps; rank 256 is missing"),
        (_byte_lines(shift=-1)[1:] + ["QUI= 255"], "byte 0x00 has no token"),
    ],
)
def test_malformed_files(tmp_path, lines, match):
    path = _write(tmp_path / "bad.model", lines)
    with pytest.raises(HerdError, match=match) as e:
        Tokenizer.from_file(path)
    assert "bad.model" in str(e.value) and "\n" not in str(e.value)


def test_missing_file_and_bad_ranks(tmp_path):
    with pytest.raises(HerdError, match="nowhere.model: tokenizer file not found"):
        Tokenizer.from_file(tmp_path / "nowhere.model")
    with pytest.raises(HerdError, match="no tokenizer.model or tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(HerdError, match="rank 256 is missing"):
        Tokenizer.from_ranks({**{bytes([b]): b for b in range(256)}, b"ab": 257})


def test_decode_partial_characters_and_bad_ids(tok):
    ids = tok.encode("🦙")
    assert len(ids) > 1 and tok.decode(ids[:1]) == "\ufffd" and tok.decode(ids) == "🦙"
    assert tok.decode_bytes(ids[:1]) + tok.decode_bytes(ids[1:]) == "🦙".encode()
    with pytest.raises(HerdError, match="token id 128256 is out of range"):
        tok.decode([1, 128256])
    with pytest.raises(HerdError, match="expected text"):
        tok.encode(b"bytes")  # type: ignore[arg-type]


def test_encode_batch(tok):
    texts = list(TEXTS.values()) + [LONG_TEXTS["letters_60k"]]
    assert tok.encode_batch(texts, bos=True, num_threads=4) == [tok.encode(t, bos=True) for t in texts]


# ---- chat format -------------------------------------------------------------------------------------

DIALOG = [
    {"role": "system", "content": "You are a helpful assistant. Answer in one sentence."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "和日本的呢？ 🗾"},
    {"role": "tool", "content": '{"result": 42}'},
]


def test_chat_format_matches_meta(tok, meta):
    from llama_models.datatypes import RawMessage
    from llama_models.llama3.chat_format import ChatFormat as MetaChatFormat

    meta_chat = MetaChatFormat(meta)
    ours = ChatFormat(tok)
    for n in range(1, len(DIALOG) + 1):
        theirs = meta_chat.encode_dialog_prompt([RawMessage(**m) for m in DIALOG[:n]]).tokens
        assert ours.encode_dialog_prompt(DIALOG[:n]) == theirs
    assert ours.encode_message(DIALOG[1]) == meta_chat.encode_message(RawMessage(**DIALOG[1]), None)[0]


def test_chat_format_layout(tok):
    chat = ChatFormat(tok)
    ids = chat.encode_dialog_prompt([{"role": "user", "content": "  Hi!\n"}])
    assert tok.decode(ids) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    no_prompt = chat.encode_dialog_prompt([{"role": "user", "content": "Hi!"}], add_generation_prompt=False)
    assert no_prompt == ids[: len(no_prompt)] and no_prompt[-1] == tok.eot_id
    assert chat.encode_header({"role": "tool", "content": ""}) == chat.encode_header("ipython")
    assert chat.decode_assistant(tok.encode("Paris.") + [tok.eot_id, 9906]) == "Paris."


@pytest.mark.parametrize(
    "dialog, match",
    [
        ([{"role": "robot", "content": "hi"}], "message 0: role 'robot' is not one of system, user"),
        ([{"role": "user", "content": "hi"}, {"role": "user", "content": 5}], "message 1: content must be a string"),
        ([{"content": "hi"}], "message 0: role None"),
        (["hi"], "message 0: expected a dict"),
        ({"role": "user", "content": "hi"}, "dialog: expected a list of messages"),
    ],
)
def test_chat_format_rejects_bad_messages(tok, dialog, match):
    with pytest.raises(HerdError, match=match):
        ChatFormat(tok).encode_dialog_prompt(dialog)


# ---- command line ------------------------------------------------------------------------------------


def _herd_tokenizer(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="herd")
    tokenizer_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["tokenizer", *argv])
    return args.func(args)


def test_cli_encode_decode(capsys, monkeypatch):
    assert _herd_tokenizer(["encode", "--tokenizer", str(META_MODEL), "--text", "Hello, world!", "--bos"]) == 0
    assert capsys.readouterr().out == "128000 9906 11 1917 0\n"
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("Hi<|eot_id|>"))
    assert _herd_tokenizer(["encode", "--tokenizer", str(META_MODEL), "--allow-special"]) == 0
    assert capsys.readouterr().out == "13347 128009\n"
    assert _herd_tokenizer(["decode", "--tokenizer", str(META_MODEL), "9906", "11", "1917", "0"]) == 0
    assert capsys.readouterr().out == "Hello, world!\n"
    with pytest.raises(HerdError, match="'x1' is not a token id"):
        _herd_tokenizer(["decode", "--tokenizer", str(META_MODEL), "1", "x1"])
    with pytest.raises(HerdError, match="tokenizer file not found"):
        _herd_tokenizer(["encode", "--tokenizer", "missing.model", "--text", "hi"])
    for sub in ("encode", "decode"):
        with pytest.raises(SystemExit):
            _herd_tokenizer([sub, "--help"])
        assert "--tokenizer" in capsys.readouterr().out
