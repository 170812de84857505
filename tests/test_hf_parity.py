"""Parity with Hugging Face transformers, the reference for the Hugging Face layout.

Logits are compared in float32 with ``torch.testing.assert_close(rtol=1e-5, atol=1e-5 * max|logit|)``;
greedy generation must give the very same tokens.
"""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import torch

import llamaherd
from llamaherd.generation import generate

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402

VOCAB = 520
ORIGINAL_CONTEXT = 64  # the test sequences (100 tokens) are longer than this
ROPE = {
    "none": None,
    "x8": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": ORIGINAL_CONTEXT},
    "x32": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": ORIGINAL_CONTEXT},
}
# head_dim 16 with theta 500,000 puts one RoPE wavelength (32.4) inside Llama 3.1's smoothly
# interpolated band [ctx/4, ctx] = [16, 64], one below it and the rest above it.
# Every combination of GQA ratio 1/2/4/8 (8 heads, 8/4/2/1 KV heads), tied or not, and RoPE scaling.
CASES = [(n_kv, tied, rope) for n_kv in (8, 4, 2, 1) for tied in (False, True) for rope in ROPE]


def assert_logits_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def random_hf_checkpoint(path, n_kv: int, tied: bool, rope: str, seed: int = 0):
    """A random LlamaForCausalLM (norm weights random too), saved with safetensors."""
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=176, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=n_kv, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=ROPE[rope], tie_word_embeddings=tied, initializer_range=0.1, bos_token_id=0,
        eos_token_id=1,
    )
    torch.manual_seed(seed)
    hf = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    hf.save_pretrained(path, safe_serialization=True)
    return hf


@pytest.mark.parametrize("n_kv,tied,rope", CASES, ids=[f"kv{k}-{'tied' if t else 'untied'}-{r}" for k, t, r in CASES])
def test_hf_checkpoint_gives_transformers_logits_and_greedy_tokens(tmp_path, n_kv, tied, rope):
    hf = random_hf_checkpoint(tmp_path, n_kv, tied, rope, seed=n_kv)
    model, tokenizer = llamaherd.load(tmp_path, dtype=torch.float32)
    assert tokenizer is None  # save_pretrained wrote no tokenizer files
    assert model.args.tie_embeddings == tied and model.args.use_scaled_rope == (rope != "none")

    ids = torch.randint(0, VOCAB, (1, 100), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_logits_close(model(ids), hf(ids).logits)

    prompt = ids[:, :60]  # 60 + 32 tokens: generation runs past the original context
    ours = generate(model, [prompt[0].tolist()], max_new_tokens=32, temperature=0.0)[0]
    ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32, min_new_tokens=32,
                      do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ours == ref[0, 60:].tolist()


@pytest.mark.parametrize("tied,max_shard_size", [(False, 10**9), (True, 100_000)], ids=["untied-1file", "tied-sharded"])
def test_our_hf_layout_loads_in_transformers(tmp_path, make_tiny_model, tied, max_shard_size):
    model = make_tiny_model(tie_embeddings=tied, use_scaled_rope=True, rope_scaling_factor=32.0,
                            rope_original_context=32)
    llamaherd.save(model, tmp_path / "hf", layout="hf", max_shard_size=max_shard_size)
    sharded = (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert sharded == (max_shard_size < 10**9)

    hf, loading = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(loading[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), loading
    assert hf.config.tie_word_embeddings == tied
    ids = torch.randint(0, VOCAB, (1, 80), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert_logits_close(model(ids), hf.eval()(ids).logits)


@pytest.fixture(scope="module")
def real_tokenizer_hf_dir(tmp_path_factory, meta_tokenizer):
    """A 128,256-token model of tiny width saved in the HF layout with Meta's real tokenizer."""
    from llamaherd.model.args import ModelArgs
    from llamaherd.model.transformer import Transformer

    model = Transformer(ModelArgs(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, multiple_of=16, max_seq_len=64))
    model.init_weights(seed=0)
    path = tmp_path_factory.mktemp("real") / "hf"
    llamaherd.save(model.eval(), path, layout="hf", tokenizer=meta_tokenizer)
    return model, path


def test_real_tokenizer_model_loads_in_transformers(real_tokenizer_hf_dir):
    model, path = real_tokenizer_hf_dir
    hf, loading = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not any(loading[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), loading
    assert hf.config.bos_token_id == 128000 and hf.generation_config.eos_token_id == [128001, 128008, 128009]
    ids = torch.tensor([[128000, 9906, 11, 1917, 0, 128009, 4999, 127999]])
    with torch.no_grad():
        assert_logits_close(model(ids), hf.eval()(ids).logits)


TEXTS = [
    "Hello, world!",
    "The capital of France is Paris.  It's 2024;\n\n  numbers 1234567 and   spaces\t\ttabs",
    "Ünïcödé — 日本語のテキスト, emoji 🦙🦙 and code: def f(x): return x**2",
    "<|begin_of_text|> is plain text here",  # special-token strings are text, as in Meta's encode
]


def test_real_tokenizer_files_give_our_ids_and_chat_template(real_tokenizer_hf_dir, meta_tokenizer):
    from llamaherd.tokenizer import ChatFormat

    _, path = real_tokenizer_hf_dir
    hf_tok = AutoTokenizer.from_pretrained(path)
    for text in TEXTS:
        # split_special_tokens: Hugging Face otherwise turns special-token strings in text into the tokens
        assert hf_tok(text, split_special_tokens=True)["input_ids"] == meta_tokenizer.encode(text, bos=True), text
    dialog = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?  "},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Japan? 日本"},
    ]
    ids = hf_tok.apply_chat_template(dialog, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, Mapping) else ids
    assert list(ids) == ChatFormat(meta_tokenizer).encode_dialog_prompt(dialog)

    _, ours = llamaherd.load(path)  # and our reader gets the same tokenizer back from tokenizer.json
    assert ours.mergeable_ranks == meta_tokenizer.mergeable_ranks
