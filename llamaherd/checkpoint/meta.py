"""Meta's layout, as ``llama model download`` writes it and Meta's reference code reads it.

    params.json            dim, n_layers, n_heads, n_kv_heads, vocab_size, multiple_of, ffn_dim_multiplier,
                           norm_eps, rope_theta, use_scaled_rope
    consolidated.NN.pth    one file per model-parallel rank
    tokenizer.model        the tiktoken rank file

Model-parallel shards are split as Meta's reference model (fairscale layers) splits them:
column-parallel wq, wk, wv, w1, w3, output and the vocab-parallel tok_embeddings on dim 0,
row-parallel wo and w2 on dim 1; the norms are replicated.

params.json has no max_seq_len (Meta's loader passes it separately): it reads as 8192, or 131072
with use_scaled_rope. We add "rope_scaling_factor" when RoPE is scaled, and the other RoPE scaling
constants and "tie_embeddings" only when they differ from what Meta's code assumes; Meta's
reference ignores keys it does not know.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from llamaherd.checkpoint.native import args_from, read_json, write_checksums, write_json
from llamaherd.errors import HerdError
from llamaherd.model.args import ModelArgs

PARAMS, TOKENIZER = "params.json", "tokenizer.model"
CONFIG = PARAMS
FILES = f"{PARAMS} + consolidated.00.pth"

_DIM0 = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "feed_forward.w1.weight",
         "feed_forward.w3.weight", "output.weight", "tok_embeddings.weight")
_DIM1 = ("attention.wo.weight", "feed_forward.w2.weight")
_META_KEYS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
              "norm_eps", "rope_theta", "use_scaled_rope")
# keys we write beyond Meta's, with the value Meta's code assumes when they are absent
_EXTRA_DEFAULTS = {"rope_low_freq_factor": 1.0, "rope_high_freq_factor": 4.0, "rope_original_context": 8192}
_IGNORED = ("max_batch_size",)  # a runtime setting, not part of the model
_LLAMA32_SHAPES = ((2048, 16), (3072, 28))  # Llama 3.2 1B and 3B: tied embeddings, RoPE factor 32


def split_dim(name: str) -> int | None:
    """The dimension model-parallel ranks split ``name`` along (None: replicated)."""
    if name.endswith(_DIM0):
        return 0
    if name.endswith(_DIM1):
        return 1
    return None


def _llama32(dim: int, n_layers: int) -> bool:
    return (dim, n_layers) in _LLAMA32_SHAPES


def read_args(ckpt: Path) -> ModelArgs:
    file = ckpt / PARAMS
    params = read_json(file)
    known = {*_META_KEYS, *_EXTRA_DEFAULTS, "rope_scaling_factor", "tie_embeddings", "max_seq_len", *_IGNORED}
    unknown = sorted(set(params) - known)
    if unknown:
        raise HerdError(f"{file}: unsupported key(s) {', '.join(unknown)} (a text-only Llama 3 checkpoint has "
                        f"{', '.join(_META_KEYS)})")
    for key in ("dim", "n_layers", "n_heads", "vocab_size"):
        if key not in params:
            raise HerdError(f"{file}: missing key {key!r}")
    d = {k: v for k, v in params.items() if k not in _IGNORED}
    shape = (d["dim"], d["n_layers"])
    d.setdefault("tie_embeddings", _llama32(*shape))
    if d.get("use_scaled_rope"):
        d.setdefault("rope_scaling_factor", 32.0 if _llama32(*shape) else 8.0)
        d.setdefault("max_seq_len", 131_072)
    else:
        d.setdefault("max_seq_len", 8192)
    return args_from(d, file)


def params_dict(args: ModelArgs) -> dict:
    """params.json for ``args``, readable by Meta's reference code."""
    a = args.to_dict()
    d = {k: a[k] for k in _META_KEYS}
    if args.use_scaled_rope:
        d["rope_scaling_factor"] = args.rope_scaling_factor
    d.update({k: a[k] for k, v in _EXTRA_DEFAULTS.items() if a[k] != v})
    if args.tie_embeddings != _llama32(args.dim, args.n_layers):
        d["tie_embeddings"] = args.tie_embeddings
    return d


def read_dtype(ckpt: Path) -> str:
    shard = _load(_shard_files(ckpt)[0])
    t = next((t for t in shard.values() if isinstance(t, torch.Tensor)), None)
    return str(t.dtype).removeprefix("torch.") if t is not None else "unknown"


def _shard_files(ckpt: Path) -> list[Path]:
    files = sorted(ckpt.glob("consolidated.*.pth"))
    if not files:
        raise HerdError(f"{ckpt}: no consolidated.00.pth next to {PARAMS}")
    want = [f"consolidated.{i:02d}.pth" for i in range(len(files))]
    if [f.name for f in files] != want:
        missing = sorted(set(want) - {f.name for f in files})
        raise HerdError(f"{ckpt}: model-parallel shards must be {want[0]}..{want[-1]}; "
                        f"{', '.join(missing) or 'the numbering'} is wrong")
    return files


def _load(file: Path) -> dict:
    try:
        sd = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # torch reports a damaged zip/pickle with many exception types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        first = first.split(". ")[0]  # torch's explanation of a damaged zip goes on for several sentences
        raise HerdError(f"{file}: cannot read this PyTorch file ({first}); is it truncated?") from None
    if not isinstance(sd, dict):
        raise HerdError(f"{file}: expected a dict of tensors, found {type(sd).__name__}")
    return sd


def read_tensors(ckpt: Path, args: ModelArgs) -> Iterator[tuple[str, torch.Tensor, str]]:
    """(name, tensor, where) for every weight, the model-parallel shards merged."""
    files = _shard_files(ckpt)
    shards = [_load(f) for f in files]
    for f, sd in zip(files[1:], shards[1:]):
        if sd.keys() != shards[0].keys():
            odd = sorted(sd.keys() ^ shards[0].keys())[0]
            raise HerdError(f"{f}: tensor {odd} is in one shard and not in {files[0].name}")
    label = files[0] if len(files) == 1 else f"{files[0]}..{files[-1].name}"
    for name, t in shards[0].items():
        where = f"{label}: tensor {name}"
        if name.endswith("rope.freqs") or name == "freqs":
            continue  # a RoPE buffer some older checkpoints carry; recomputed from params.json
        dim = split_dim(name)
        if len(shards) > 1 and dim is not None:
            parts = [sd[name] for sd in shards]
            if any(p.ndim <= dim for p in parts):
                raise HerdError(f"{where} has shape {list(t.shape)}, which cannot be a model-parallel shard")
            t = torch.cat(parts, dim=dim)
        yield name, t, where


def file_name(meta_name: str) -> str:
    return meta_name


def weights_label(ckpt: Path) -> str:
    files = sorted(ckpt.glob("consolidated.*.pth"))
    return str(files[0]) if len(files) == 1 else f"{ckpt}/consolidated.*.pth"


def read_tokenizer(ckpt: Path):
    from llamaherd.tokenizer import Tokenizer

    file = ckpt / TOKENIZER
    return (Tokenizer.from_file(file), file) if file.is_file() else None


def write(out: Path, args: ModelArgs, tensors: dict[str, torch.Tensor], tokenizer, dtype: torch.dtype,
          shards: int = 1) -> None:
    """Write Meta's layout into ``out``, and checksums.json."""
    if shards < 1:
        raise HerdError(f"shards must be >= 1, got {shards}")
    if args.n_kv_heads % shards or args.vocab_size % shards:
        raise HerdError(f"cannot split a model with {args.n_kv_heads} KV heads and vocab_size {args.vocab_size} "
                        f"into {shards} model-parallel shards (both must be divisible by it)")
    tensors = dict(tensors)
    if args.tie_embeddings:  # Meta's files always hold the output head
        tensors["output.weight"] = tensors["tok_embeddings.weight"]
    for rank in range(shards):
        shard = {}
        for name, t in tensors.items():
            dim = split_dim(name)
            if shards > 1 and dim is not None:
                t = t.chunk(shards, dim=dim)[rank]
            t = t.to(device="cpu", dtype=dtype)
            if t.storage_offset() or t.untyped_storage().nbytes() != t.nbytes or not t.is_contiguous():
                t = t.contiguous().clone()  # torch.save writes a view's whole storage
            shard[name] = t
        torch.save(shard, out / f"consolidated.{rank:02d}.pth")
        del shard
    write_json(out / PARAMS, params_dict(args))
    if tokenizer is not None:
        tokenizer.save(out / TOKENIZER)
    write_checksums(out)
