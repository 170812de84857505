"""Hugging Face tokenizer files for a Llama 3 tokenizer, and back.

``write_hf_tokenizer`` writes tokenizer.json (a byte-level BPE like the one in Hugging Face Llama 3
checkpoints), tokenizer_config.json (with the Llama 3 Instruct chat template) and
special_tokens_map.json. ``read_hf_tokenizer`` recovers the tiktoken ranks from tokenizer.json.

tiktoken needs no merge list: it merges any two adjacent pieces whose concatenation is a token,
lowest rank first. A merge list does the same when it holds every split of every token into two
tokens, ordered by the rank of the token they make, and ``ignore_merges`` looks a whole pre-token
up first as tiktoken does. transformers' own tiktoken converter builds its list the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

from llamaherd.errors import HerdError
from llamaherd.tokenizer.tiktoken_bpe import PAT_STR, SPECIAL_TOKENS, Tokenizer

# the Llama 3 Instruct template: bos, each message as header + content|trim + eot, generation prompt;
# the `tool` role is written `ipython` as in Meta's reference and our ChatFormat
LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}"
    "{%- set role = 'ipython' if message['role'] == 'tool' else message['role'] %}"
    "{{- '<|start_header_id|>' + role + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: printable bytes stand for themselves, the rest map above U+0100."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = (b for b in range(256) if b not in printable)
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


_TO_CHAR = str.maketrans({chr(b): c for b, c in bytes_to_unicode().items()})  # latin-1 char -> alphabet
_TO_LATIN1 = str.maketrans({c: chr(b) for b, c in bytes_to_unicode().items()})  # alphabet -> latin-1 char
_ALPHABET = frozenset(bytes_to_unicode().values())


def _as_unicode(token: bytes) -> str:
    return token.decode("latin-1").translate(_TO_CHAR)


def bpe_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Every split of every token into two tokens, ordered by the rank of the token they make."""
    merges = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()  # by (rank, left rank, right rank): unique, so the bytes are never compared
    return [(left, right) for *_, left, right in merges]


def write_hf_tokenizer(
    tokenizer: Tokenizer,
    out_dir: str | Path,
    model_max_length: int = 131072,
    eos_token: str = "<|eot_id|>",
    chat_template: str = LLAMA3_CHAT_TEMPLATE,
) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into ``out_dir``.

    ``eos_token`` is ``<|eot_id|>`` for chat (instruct) models, ``<|end_of_text|>`` for base models.
    """
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as HFTokenizer

    if eos_token not in tokenizer.special_tokens:
        raise HerdError(f"eos_token {eos_token!r} is not a special token (expected e.g. '<|eot_id|>')")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ranks = tokenizer.mergeable_ranks
    as_text = {tok: _as_unicode(tok) for tok in ranks}
    merges = [(as_text[a], as_text[b]) for a, b in bpe_merges(ranks)]
    hf = HFTokenizer(models.BPE({as_text[t]: r for t, r in ranks.items()}, merges, ignore_merges=True))
    hf.normalizer = None
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PAT_STR), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    bos = "<|begin_of_text|>"
    hf.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.bos_id)]
            ),
        ]
    )
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    if hf.token_to_id(bos) != tokenizer.bos_id:  # specials must land right after the ranks
        raise AssertionError(f"{bos} got id {hf.token_to_id(bos)}, expected {tokenizer.bos_id}")
    hf.save(str(out / "tokenizer.json"), pretty=False)

    config = {
        "bos_token": bos,
        "eos_token": eos_token,
        "chat_template": chat_template,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": model_max_length,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    special_map = {"bos_token": bos, "eos_token": eos_token}
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")


def read_hf_tokenizer(path: str | Path) -> Tokenizer:
    """Load a Llama 3 style tokenizer.json (a file, or a directory holding one) as our Tokenizer."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise HerdError(f"{file}: not found (expected a Hugging Face tokenizer.json)")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
        model = data["model"]
        vocab: dict[str, int] = model["vocab"]
        added = {t["content"] for t in data.get("added_tokens", []) if t.get("special")}
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise HerdError(f"{file}: not a Hugging Face tokenizer.json ({type(e).__name__}: {e})") from None
    if model.get("type") != "BPE" or not isinstance(vocab, dict):
        raise HerdError(f"{file}: model type {model.get('type')!r} is not supported (expected a byte-level 'BPE')")
    pre = data.get("pre_tokenizer") or {}
    splits = [p.get("pattern", {}).get("Regex") for p in pre.get("pretokenizers", [pre]) if p.get("type") == "Split"]
    if PAT_STR not in splits:
        raise HerdError(f"{file}: pre_tokenizer does not split with Llama 3's regex (expected {PAT_STR!r})")
    vocab = {t: r for t, r in vocab.items() if t not in added}
    bad = set("".join(vocab)) - _ALPHABET
    if bad:
        text = next(t for t in vocab if bad & set(t))
        raise HerdError(f"{file}: token {text!r} is not in the byte-level alphabet (expected a byte-level BPE)")
    ranks = {t.translate(_TO_LATIN1).encode("latin-1"): r for t, r in vocab.items()}
    return Tokenizer(ranks, name=str(file))
