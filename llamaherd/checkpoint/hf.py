"""The Hugging Face layout (LlamaForCausalLM), as in Meta's checkpoints on the Hugging Face Hub.

    config.json                      hidden_size, num_hidden_layers, rope_scaling, ...
    model.safetensors                or model-00001-of-0000N.safetensors + model.safetensors.index.json
    generation_config.json           bos, the stop tokens, Meta's sampling defaults
    tokenizer.json, tokenizer_config.json, special_tokens_map.json

Names map one to one (w1 = gate_proj, w2 = down_proj, w3 = up_proj). Meta's RoPE rotates
interleaved pairs (x0, x1), (x2, x3), ...; Hugging Face's rotates the two halves of each head, so
the rows of wq and wk are permuted within every head on the way in and back on the way out.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from llamaherd.checkpoint.native import (
    args_from,
    dtype_name,
    read_json,
    read_safetensors,
    write_checksums,
    write_json,
    write_safetensors,
)
from llamaherd.errors import HerdError
from llamaherd.model.args import ModelArgs

CONFIG, SINGLE, INDEX = "config.json", "model.safetensors", "model.safetensors.index.json"
FILES = f"{CONFIG} + {SINGLE} (or {INDEX})"
MAX_SHARD_SIZE = 5_000_000_000

_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}
_LAYER = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_BACK = {v: k for k, v in _TOP.items()}
_LAYER_BACK = {v: k for k, v in _LAYER.items()}

# Llama 3 special token ids, used in config.json when no tokenizer is saved with a 128,256-token model
_LLAMA3_BOS, _LLAMA3_STOPS = 128000, [128001, 128008, 128009]
# what Meta's instruct checkpoints ship in generation_config.json
_SAMPLING = {"do_sample": True, "temperature": 0.6, "top_p": 0.9}


def file_name(meta_name: str) -> str:
    """Meta name -> Hugging Face name."""
    if meta_name in _TOP:
        return _TOP[meta_name]
    _, i, rest = meta_name.split(".", 2)
    return f"model.layers.{i}.{_LAYER[rest]}"


def meta_name(hf_name: str) -> str | None:
    """Hugging Face name -> Meta name (None for a name that is not a Llama weight)."""
    if hf_name in _TOP_BACK:
        return _TOP_BACK[hf_name]
    parts = hf_name.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in _LAYER_BACK:
        return f"layers.{parts[2]}.{_LAYER_BACK[parts[3]]}"
    return None


def to_hf_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of wq/wk from Meta's interleaved pairs to Hugging Face's half split, per head."""
    rows, dim = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, dim).transpose(1, 2).reshape(rows, dim)


def from_hf_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of ``to_hf_rope``."""
    rows, dim = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, dim).transpose(1, 2).reshape(rows, dim)


def _rope_heads(args: ModelArgs, name: str) -> int | None:
    """Heads to permute for a Meta name (wq: n_heads, wk: n_kv_heads), or None."""
    if name.endswith("attention.wq.weight"):
        return args.n_heads
    if name.endswith("attention.wk.weight"):
        return args.n_kv_heads
    return None


# --- config ------------------------------------------------------------------------------------

def _ffn_args(dim: int, hidden: int) -> dict:
    """``multiple_of`` and ``ffn_dim_multiplier`` that give the SwiGLU size ``hidden``.

    Several pairs give the same size; Meta's own pair is preferred for a published shape, then the
    largest power-of-two ``multiple_of``, then one that always works.
    """
    from llamaherd.model.args import PRESETS

    candidates = [(p["multiple_of"], p.get("ffn_dim_multiplier")) for p in PRESETS.values() if p["dim"] == dim]
    candidates += [(2**k, None) for k in range(12, -1, -1)]
    base = int(2 * 4 * dim / 3)
    candidates += [(hidden, None), (hidden, hidden / base)]  # rounds up to `hidden` itself
    for multiple_of, mult in candidates:
        h = int(mult * base) if mult is not None else base
        if h > 0 and multiple_of * ((h + multiple_of - 1) // multiple_of) == hidden:
            return {"multiple_of": multiple_of, "ffn_dim_multiplier": mult}
    raise HerdError(f"intermediate_size {hidden} cannot be expressed for hidden_size {dim}")


def read_args(ckpt: Path) -> ModelArgs:
    file = ckpt / CONFIG
    cfg = read_json(file)

    def need(key, types=(int,)):
        if key not in cfg:
            raise HerdError(f"{file}: missing key {key!r}")
        if not isinstance(cfg[key], types) or isinstance(cfg[key], bool):
            raise HerdError(f"{file}: {key} must be a number, got {cfg[key]!r}")
        return cfg[key]

    if cfg.get("model_type", "llama") != "llama":
        raise HerdError(f"{file}: model_type {cfg.get('model_type')!r} is not supported (expected 'llama')")
    for key, want in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if cfg.get(key, want) != want:
            raise HerdError(f"{file}: {key} is {cfg[key]!r}; Llama 3 needs {want!r}")
    dim, heads = need("hidden_size"), need("num_attention_heads")
    hidden = need("intermediate_size")
    if dim <= 0 or heads <= 0 or hidden <= 0:
        raise HerdError(f"{file}: hidden_size, num_attention_heads and intermediate_size must be positive")
    if dim % heads:
        raise HerdError(f"{file}: hidden_size {dim} is not divisible by num_attention_heads {heads}")
    if cfg.get("head_dim") not in (None, dim // heads):
        raise HerdError(f"{file}: head_dim {cfg['head_dim']} != hidden_size / num_attention_heads = {dim // heads}")
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise HerdError(f"{file}: rope type {rope_type!r} is not supported (expected 'llama3' or none)")
    theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))  # 10000: Hugging Face's default
    d = dict(
        dim=dim, n_layers=need("num_hidden_layers"), n_heads=heads,
        n_kv_heads=cfg.get("num_key_value_heads") or heads, vocab_size=need("vocab_size"),
        norm_eps=float(need("rms_norm_eps", (int, float))), rope_theta=float(theta),
        max_seq_len=need("max_position_embeddings"), tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        **_ffn_args(dim, hidden),
    )
    if rope_type == "llama3":
        d.update(use_scaled_rope=True, rope_scaling_factor=float(rope["factor"]),
                 rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
                 rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
                 rope_original_context=int(rope.get("original_max_position_embeddings", 8192)))
    return args_from(d, file)


def read_dtype(ckpt: Path) -> str:
    cfg = read_json(ckpt / CONFIG)
    return str(cfg.get("torch_dtype") or cfg.get("dtype"))


def _token_ids(args: ModelArgs, tokenizer) -> tuple[int | None, list[int] | None]:
    if tokenizer is not None:
        return tokenizer.bos_id, list(tokenizer.stop_tokens)
    if args.vocab_size == 128_256:
        return _LLAMA3_BOS, list(_LLAMA3_STOPS)
    return None, None


def config_dict(args: ModelArgs, dtype: torch.dtype, tokenizer=None) -> dict:
    """config.json as in Meta's Llama 3 checkpoints on the Hugging Face Hub."""
    bos, stops = _token_ids(args, tokenizer)
    rope_scaling = None
    if args.use_scaled_rope:
        rope_scaling = {"factor": args.rope_scaling_factor, "low_freq_factor": args.rope_low_freq_factor,
                        "high_freq_factor": args.rope_high_freq_factor,
                        "original_max_position_embeddings": args.rope_original_context, "rope_type": "llama3"}
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": bos,
        "eos_token_id": stops,
        "head_dim": args.head_dim,
        "hidden_act": "silu",
        "hidden_size": args.dim,
        "initializer_range": 0.02,
        "intermediate_size": args.hidden_dim,
        "max_position_embeddings": args.max_seq_len,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": args.n_heads,
        "num_hidden_layers": args.n_layers,
        "num_key_value_heads": args.n_kv_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": args.norm_eps,
        "rope_scaling": rope_scaling,
        "rope_theta": args.rope_theta,
        "tie_word_embeddings": args.tie_embeddings,
        "torch_dtype": dtype_name(dtype),
        "use_cache": True,
        "vocab_size": args.vocab_size,
    }


# --- tensors ----------------------------------------------------------------------------------

def _weight_files(ckpt: Path) -> list[Path]:
    if (ckpt / SINGLE).is_file():
        return [ckpt / SINGLE]
    if (ckpt / INDEX).is_file():
        index = read_json(ckpt / INDEX)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise HerdError(f"{ckpt / INDEX}: no 'weight_map' of tensor names to files")
        return [ckpt / f for f in dict.fromkeys(weight_map.values())]
    if any(ckpt.glob("pytorch_model*.bin")):
        raise HerdError(f"{ckpt}: pytorch_model.bin weights are not supported (expected {SINGLE} or {INDEX})")
    raise HerdError(f"{ckpt}: no {SINGLE} or {INDEX} next to {CONFIG}")


def weights_label(ckpt: Path) -> str:
    return str(ckpt / SINGLE) if (ckpt / SINGLE).is_file() else str(ckpt / INDEX)


def read_tensors(ckpt: Path, args: ModelArgs) -> Iterator[tuple[str, torch.Tensor, str]]:
    """(Meta name, tensor, where) for every weight; wq/wk come back in Meta's row order."""
    for file in _weight_files(ckpt):
        for name, t in read_safetensors(file):
            where = f"{file}: tensor {name}"
            if name.endswith("rotary_emb.inv_freq"):
                continue  # a buffer older transformers saved; recomputed from config.json
            ours = meta_name(name)
            if ours is None:
                raise HerdError(f"{where} is not a Llama weight (unexpected tensor)")
            heads = _rope_heads(args, ours)
            if heads is not None and t.shape == (heads * args.head_dim, args.dim):  # else the shape check reports it
                t = from_hf_rope(t, heads)
            yield ours, t, where


def read_tokenizer(ckpt: Path):
    from llamaherd.tokenizer import Tokenizer
    from llamaherd.tokenizer.hf import read_hf_tokenizer

    if (ckpt / "tokenizer.json").is_file():
        return read_hf_tokenizer(ckpt / "tokenizer.json"), ckpt / "tokenizer.json"
    if (ckpt / "original" / "tokenizer.model").is_file():
        return Tokenizer.from_file(ckpt / "original" / "tokenizer.model"), ckpt / "original" / "tokenizer.model"
    return None


def write(out: Path, args: ModelArgs, tensors: dict[str, torch.Tensor], tokenizer, dtype: torch.dtype,
          max_shard_size: int = MAX_SHARD_SIZE) -> None:
    """Write the Hugging Face layout into ``out``, and checksums.json."""
    hf = {file_name(n): t for n, t in tensors.items()}
    hf_to_meta = {file_name(n): n for n in tensors}

    def to_hf(name, t):
        heads = _rope_heads(args, hf_to_meta[name])
        return to_hf_rope(t, heads) if heads is not None else t

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in hf.items():
        nbytes = t.numel() * dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    sums = {}
    if len(shards) == 1:
        sums[SINGLE] = write_safetensors(out / SINGLE, hf, dtype, to_hf)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            sums[fname] = write_safetensors(out / fname, shard, dtype, to_hf)
            weight_map.update(dict.fromkeys(shard, fname))
        total = sum(t.numel() * dtype.itemsize for t in hf.values())
        write_json(out / INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})

    write_json(out / CONFIG, config_dict(args, dtype, tokenizer))
    bos, stops = _token_ids(args, tokenizer)
    gen = {"bos_token_id": bos, "eos_token_id": stops, **_SAMPLING}
    write_json(out / "generation_config.json", {k: v for k, v in gen.items() if v is not None})
    if tokenizer is not None:
        from llamaherd.tokenizer.hf import write_hf_tokenizer

        write_hf_tokenizer(tokenizer, out, model_max_length=args.max_seq_len)
    write_checksums(out, sums)
