"""Hugging Face tokenizer files written from our tokenizer load in transformers and give the same ids,
the same chat prompts, and read back to the same ranks."""

from __future__ import annotations

import importlib.resources
import json

import pytest

from llamaherd.errors import HerdError
from llamaherd.tokenizer import ChatFormat, Tokenizer, load_tokenizer
from llamaherd.tokenizer.hf import read_hf_tokenizer, write_hf_tokenizer

pytest.importorskip("llama_models")
transformers = pytest.importorskip("transformers")

META_MODEL = importlib.resources.files("llama_models.llama3") / "tokenizer.model"

SAMPLES = [
    "Hello, world! It's a test — isn't it? We'll see; THEY'RE sure.",
    "import torch\n\nclass Net(torch.nn.Module):\n    def forward(self, x):\n\t\treturn x @ x.T  # 2x\n",
    "int main() {\r\n  printf(\"%s\\n\", argv[0]);\r\n  return 0;\r\n}",
    "机器学习是人工智能的一个分支。日本語の文章です。한국어 문장입니다.",
    "مرحبا بالعالم. नमस्ते दुनिया। Привет, мир! Γειά σου Κόσμε! שלום עולם. สวัสดีชาวโลก",
    "Größenwahn, çà et là, Tiếng Việt, İstanbul'da ılık, 1234567 3.14 ١٢٣",
    "emoji 🦙🦙 👩‍💻 👨‍👩‍👧‍👦 🏳️‍🌈 🧑🏽‍🚀 ❤️‍🔥 🇯🇵",
    " " * 3000 + "x" + "\n" * 500 + "\t \t" * 300 + "\r\n" * 100 + "y   ",
    "\u00a0\u3000 a\u2028b  \n\n  ",
    "z" * 5000 + "字" * 2000,
    "<|begin_of_text|>text<|eot_id|> and <|start_header_id|>user<|end_header_id|>",
    "",
]
DIALOG = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "What's 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "\n  And the capital of 日本?  \n\n"},
    {"role": "tool", "content": "  {\"city\": \"Tokyo\"}\n"},
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_file(META_MODEL)


@pytest.fixture(scope="module")
def hf_dir(tok, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf")
    write_hf_tokenizer(tok, out)
    return out


@pytest.fixture(scope="module")
def hf(hf_dir):
    return transformers.AutoTokenizer.from_pretrained(hf_dir)


@pytest.mark.parametrize("i", range(len(SAMPLES)))
def test_transformers_gives_our_ids(tok, hf, i):
    text = SAMPLES[i]
    ours = tok.encode(text, allowed_special="all")  # transformers always reads special-token strings as specials
    assert hf(text, add_special_tokens=False)["input_ids"] == ours
    assert hf(text)["input_ids"] == tok.encode(text, bos=True, allowed_special="all")
    assert hf.decode(ours) == tok.decode(ours) == text


def test_chat_template_matches_chat_format(tok, hf):
    chat = ChatFormat(tok)
    for n in range(1, len(DIALOG) + 1):
        for gen in (True, False):
            theirs = hf.apply_chat_template(DIALOG[:n], add_generation_prompt=gen, tokenize=True, return_dict=False)
            assert theirs == chat.encode_dialog_prompt(DIALOG[:n], add_generation_prompt=gen)
    text = hf.apply_chat_template(DIALOG[3:4], add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nAnd the capital of 日本?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_files_and_special_tokens(tok, hf, hf_dir):
    config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and config["model_max_length"] == 131072
    assert json.loads((hf_dir / "special_tokens_map.json").read_text()) == {
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
    }
    assert (hf.bos_token_id, hf.eos_token_id, len(hf)) == (tok.bos_id, tok.eot_id, tok.n_words)
    assert all(hf.convert_tokens_to_ids(name) == i for name, i in tok.special_tokens.items())
    merges = json.loads((hf_dir / "tokenizer.json").read_text())["model"]["merges"]
    assert len(merges) == 280_147  # every split of a token into two tokens


def test_read_back_ranks(tok, hf_dir):
    back = read_hf_tokenizer(hf_dir)
    assert back.mergeable_ranks == tok.mergeable_ranks and back.special_tokens == tok.special_tokens


def _small_tokenizer() -> Tokenizer:
    ranks = {bytes([b]): b for b in range(256)}
    for merged in (b"he", b"ll", b"hell", b"hello", b" w", b"or", b" wor", b" world", "é".encode(), b"\xe6\x97"):
        ranks[merged] = len(ranks)
    return Tokenizer.from_ranks(ranks)


def test_small_vocabulary_round_trip(tmp_path):
    small = _small_tokenizer()
    write_hf_tokenizer(small, tmp_path, model_max_length=8192, eos_token="<|end_of_text|>")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in ("hello world", "hello, wörld 日本 été<|eot_id|>", " \n\thello"):
        assert hf(text)["input_ids"] == small.encode(text, bos=True, allowed_special="all")
    assert hf.apply_chat_template(DIALOG, tokenize=True, return_dict=False) == ChatFormat(small).encode_dialog_prompt(
        DIALOG, add_generation_prompt=False
    )
    assert (hf.eos_token, hf.eos_token_id, hf.model_max_length) == ("<|end_of_text|>", small.eos_id, 8192)
    back = load_tokenizer(tmp_path)  # a directory with only tokenizer.json
    assert back.mergeable_ranks == small.mergeable_ranks and back.bos_id == len(small.mergeable_ranks)


def test_write_and_read_errors(tmp_path):
    small = _small_tokenizer()
    with pytest.raises(HerdError, match="eos_token '<eos>' is not a special token"):
        write_hf_tokenizer(small, tmp_path, eos_token="<eos>")
    with pytest.raises(HerdError, match="tokenizer.json: not found"):
        read_hf_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(HerdError, match="not a Hugging Face tokenizer.json"):
        read_hf_tokenizer(tmp_path)
    write_hf_tokenizer(small, tmp_path)
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    data["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\w+|\s+"
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(HerdError, match="does not split with Llama 3's regex"):
        read_hf_tokenizer(tmp_path)
    data = {"model": {"type": "Unigram", "vocab": []}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(HerdError, match="model type 'Unigram' is not supported"):
        read_hf_tokenizer(tmp_path)
    pre = {"type": "Split", "pattern": {"Regex": Tokenizer.pat_str}}
    data = {"pre_tokenizer": pre, "model": {"type": "BPE", "vocab": {"a b": 0}}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(HerdError, match="token 'a b' is not in the byte-level alphabet"):
        read_hf_tokenizer(tmp_path)
