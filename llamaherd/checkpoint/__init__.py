"""Checkpoints: Meta's layout, Hugging Face's, and our own ("herd"), detected automatically.

    >>> model, tokenizer = load("Llama3.2-1B-Instruct")          # any of the three layouts
    >>> save(model, "out-hf", layout="hf", tokenizer=tokenizer)   # atomically, in one of them
    >>> convert("Llama3.2-1B-Instruct", "out-herd", to="herd", dtype="bfloat16")

Loading builds the model on the meta device and assigns each tensor as it is read from the
memory-mapped files, so a checkpoint is never held twice in memory: a tensor already of the wanted
dtype and on the CPU stays a copy-on-write view of its file. Every layout gets a checksums.json
(sha256 and size of each file), verified on load. Each layout module (meta, hf, native) has the
same small set of functions: read_args, read_tensors, read_tokenizer, read_dtype, write.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from llamaherd.errors import HerdError

LAYOUTS = ("herd", "hf", "meta")
_MARKERS = {"herd": "herd.json", "hf": "config.json", "meta": "params.json"}  # checked in this order
MAX_SHARD_SIZE = 5_000_000_000

__all__ = ["LAYOUTS", "detect", "load", "save", "convert", "info", "resolve", "quantize_checkpoint"]


def _module(layout: str):
    from llamaherd.checkpoint import hf, meta, native

    return {"herd": native, "hf": hf, "meta": meta}[layout]


def resolve(path: str | os.PathLike) -> Path:
    """The checkpoint directory ``path`` names.

    A training run directory (``runs/NAME``, with ``checkpoints/step_*/``) names its newest checkpoint
    whose checksums verify, so ``load``/``convert``/``info``/``herd generate`` accept a run directory. A main
    job's run that went on to post-training (``results.json``) names its last stage's model: its chat model.
    """
    path = Path(path)
    final = _final_stage(path)
    if final is not None:
        return final
    if (path / "checkpoints").is_dir() and not any((path / m).is_file() for m in _MARKERS.values()):
        from llamaherd.checkpoint.runs import latest_good

        ckpt = latest_good(path)
        if ckpt is None:
            raise HerdError(f"{path}: training run has no complete checkpoint yet")
        return ckpt
    return path


def _final_stage(run_dir: Path) -> Path | None:
    """The checkpoint of the last stage in ``run_dir/results.json``, when there is one and it exists."""
    import json

    try:
        stages = json.loads((run_dir / "results.json").read_text())["stages"]
        final = Path(stages[-1]["checkpoint"])
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None
    return final if len(stages) > 1 and final.is_dir() else None


def detect(path: str | os.PathLike) -> str:
    """The layout of the checkpoint directory ``path``: "herd", "hf" or "meta"."""
    path = resolve(path)
    if not path.exists():
        raise HerdError(f"{path}: checkpoint directory not found")
    if not path.is_dir():
        raise HerdError(f"{path}: not a directory (a checkpoint is a directory of files)")
    for layout, marker in _MARKERS.items():
        if (path / marker).is_file():
            return layout
    expected = "; ".join(f"{name}: {_module(name).FILES}" for name in ("meta", "hf", "herd"))
    raise HerdError(f"{path}: unknown checkpoint layout (expected {expected})")


def _read_tokenizer(path: Path, layout: str, vocab_size: int):
    found = _module(layout).read_tokenizer(path)
    if found is None:
        return None
    tokenizer, file = found
    if tokenizer.n_words > vocab_size:
        raise HerdError(f"tokenizer {file} has {tokenizer.n_words} tokens but model vocab_size is {vocab_size}")
    return tokenizer


def load(path: str | os.PathLike, device=None, dtype=None, *, tokenizer: bool = True, verify: bool = True):
    """Load a checkpoint of any layout: ``(model, tokenizer or None)``, the model in eval mode.

    ``dtype`` (a torch dtype or "float32"/"bfloat16"/"float16") defaults to the checkpoint's;
    ``device`` to the CPU. ``tokenizer=False`` skips reading the tokenizer files. ``verify`` checks
    the files against checksums.json (required in the herd layout, used in the others when present).
    A quantised herd checkpoint (``quantize_checkpoint``) loads with its int8 / int4 linear layers
    (``llamaherd.model.quant``), built for ``device``; ``dtype`` is then the dtype it runs in.
    """
    path = resolve(path)
    layout = detect(path)  # before importing torch: a wrong path is reported at once

    import torch
    from torch import nn

    from llamaherd.checkpoint.native import CHECKSUMS, parse_dtype, read_quantization, verify_checksums
    from llamaherd.model import quant
    from llamaherd.model.transformer import Transformer

    mod = _module(layout)
    if verify and (layout == "herd" or (path / CHECKSUMS).is_file()):
        verify_checksums(path)
    args = mod.read_args(path)
    qcfg = read_quantization(path) if layout == "herd" else None
    dtype = parse_dtype(dtype)
    device = torch.device(device or "cpu")
    tok = _read_tokenizer(path, layout, args.vocab_size) if tokenizer else None

    with torch.device("meta"):
        model = Transformer(args)
    expected = {name: p.shape for name, p in model.named_parameters()}  # a tied weight once, as embeddings
    plain: dict[str, torch.Tensor] = {}  # a quantised checkpoint's quantised tensors, made into modules below
    plain_shapes = quant.plain_shapes(model, qcfg) if qcfg is not None else {}
    if qcfg is not None:
        for name in quant.linear_names(model, qcfg):
            expected.pop(f"{name}.weight", None)
        expected |= {name: torch.Size(shape) for name, shape in plain_shapes.items()}
    tied_head = args.tie_embeddings and not (qcfg is not None and qcfg.head)
    seen: set[str] = set()
    tied_output = None  # (tensor, where): Meta's files, and some Hugging Face ones, hold the tied head too
    for name, t, where in mod.read_tensors(path, args):
        if name == "output.weight" and tied_head:
            tied_output = (t, where)
            continue
        if name not in expected:
            raise HerdError(f"{where} is not a weight of this model (unexpected tensor)")
        if name in seen:
            raise HerdError(f"{where} appears twice")
        if t.shape != expected[name]:
            raise HerdError(f"{where} has shape {list(t.shape)} but the model expects {list(expected[name])}")
        if dtype is None and t.is_floating_point():
            dtype = t.dtype
        owner, _, attr = name.rpartition(".")
        t = t.to(device=device, dtype=dtype if t.is_floating_point() else None)
        if name in plain_shapes:
            plain[name] = t
        else:
            setattr(model.get_submodule(owner), attr, nn.Parameter(t, requires_grad=t.is_floating_point()))
        seen.add(name)
    missing = [name for name in expected if name not in seen]
    if missing:
        name = missing[0]
        raise HerdError(f"{mod.weights_label(path)}: tensor {mod.file_name(name)} is missing "
                        f"(expected shape {list(expected[name])}; {len(missing)} missing in all)")
    if qcfg is not None:
        try:
            quant.install(model, plain, qcfg)
        except HerdError as e:
            raise HerdError(f"{mod.weights_label(path)}: {e}") from None
    if tied_head:
        emb = model.tok_embeddings.weight
        if tied_output is not None:
            t, where = tied_output
            if t.shape != emb.shape or not torch.equal(t.to(device=device, dtype=emb.dtype), emb):
                raise HerdError(f"{where} differs from tok_embeddings.weight, but {path / mod.CONFIG} makes the "
                                "embeddings tied (set tie_embeddings to false there to keep both)")
        model.output.weight = emb
    model.init_rope(device)
    model.eval()
    return model, tok


def _check_target(path: Path, overwrite: bool) -> None:
    if path.exists() and not path.is_dir():
        raise HerdError(f"{path}: exists and is not a directory")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise HerdError(f"{path}: directory exists and is not empty (pass overwrite=True / --overwrite "
                            "to replace it)")
        try:
            detect(path)
        except HerdError:
            raise HerdError(f"{path}: refusing to replace a non-empty directory that is not a checkpoint") from None


def save(model, path: str | os.PathLike, layout: str = "herd", tokenizer=None, dtype=None, *,
         shards: int = 1, max_shard_size: int = MAX_SHARD_SIZE, overwrite: bool = False) -> Path:
    """Write ``model`` (and ``tokenizer``) as a checkpoint directory ``path`` in ``layout``.

    The files are written into a temporary directory next to ``path`` and renamed into place when
    complete. ``shards`` is the number of model-parallel files for the Meta layout;
    ``max_shard_size`` (bytes) splits the Hugging Face weights into several files.
    """
    from llamaherd.checkpoint import native
    from llamaherd.model.quant import quantized

    if layout not in LAYOUTS:
        raise HerdError(f"unknown checkpoint layout {layout!r} (expected one of {', '.join(LAYOUTS)})")
    done = quantized(model)
    if done is not None:  # its int4 weights are in a device's packed layout: the plain form is made from floats
        raise HerdError(f"save: the model is quantised ({done.describe()}); write a quantised checkpoint from the "
                        "float one with quantize_checkpoint (herd quantize)")
    if shards != 1 and layout != "meta":
        raise HerdError(f"shards={shards} applies to the meta layout only (hf uses max_shard_size)")
    path = Path(path)
    args = model.args
    if tokenizer is not None and tokenizer.n_words > args.vocab_size:
        raise HerdError(f"tokenizer has {tokenizer.n_words} tokens but model vocab_size is {args.vocab_size}")
    tensors = dict(model.named_parameters())  # a tied weight once, as tok_embeddings.weight
    dtype = native.parse_dtype(dtype) or tensors["tok_embeddings.weight"].dtype
    opts = {"meta": {"shards": shards}, "hf": {"max_shard_size": max_shard_size}, "herd": {}}[layout]
    _check_target(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        import torch

        with torch.no_grad():
            _module(layout).write(tmp, args, {n: t.detach() for n, t in tensors.items()}, tokenizer, dtype, **opts)
        native.publish(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def convert(src: str | os.PathLike, dst: str | os.PathLike, to: str, dtype=None, *, shards: int = 1,
            max_shard_size: int = MAX_SHARD_SIZE, overwrite: bool = False) -> Path:
    """Convert the checkpoint ``src`` (any layout) to ``dst`` in layout ``to``, tokenizer included."""
    src = resolve(src)
    detect(src)
    if Path(dst).resolve() == src.resolve():
        raise HerdError(f"{dst}: the destination is the source checkpoint")
    if to not in LAYOUTS:
        raise HerdError(f"unknown checkpoint layout {to!r} (expected one of {', '.join(LAYOUTS)})")
    _check_target(Path(dst), overwrite)
    model, tokenizer = load(src)  # memory-mapped: tensors are read from src as they are written
    return save(model, dst, layout=to, tokenizer=tokenizer, dtype=dtype, shards=shards,
                max_shard_size=max_shard_size, overwrite=overwrite)


def quantize_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, scheme: str = "int8",
                        group_size: int | None = None, head: bool | None = None, dtype="bfloat16", *,
                        overwrite: bool = False) -> Path:
    """Write the float checkpoint ``src`` (any layout) weight-only quantised, as the herd checkpoint ``dst``.

    ``scheme`` "int8" or "int4", ``group_size`` and ``head`` as ``llamaherd.model.quant.quantize`` takes them;
    ``dtype``: the floating dtype the quantised model runs in (its scales, embeddings and norms; bfloat16,
    which both the CPU and the CUDA kernels are fast with; None keeps the source's). herd.json says how it
    was quantised (see ``native``); the tokenizer comes along. ``load(dst)`` then gives the model that
    ``quantize(load(src)[0], scheme, group_size, head, dtype)`` makes in memory, tensor for tensor.
    """
    import torch

    from llamaherd.checkpoint import native
    from llamaherd.model import quant

    cfg = quant.quant_config(scheme, group_size, head)
    dtype = native.parse_dtype(dtype)
    src = resolve(src)
    layout = detect(src)
    dst = Path(dst)
    if dst.resolve() == src.resolve():
        raise HerdError(f"{dst}: the destination is the source checkpoint")
    if layout == "herd" and native.read_quantization(src) is not None:
        raise HerdError(f"{src}: is already quantised ({native.read_quantization(src).describe()}); "
                        "quantise its float checkpoint")
    _check_target(dst, overwrite)
    model, tokenizer = load(src)  # memory-mapped: each weight is read as it is quantised
    quant.check_widths(model, cfg)
    dtype = dtype or model.tok_embeddings.weight.dtype
    with torch.no_grad():
        tensors = quant.quantize_state_dict({n: p.detach() for n, p in model.named_parameters()}, cfg, dtype)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        native.write(tmp, model.args, tensors, tokenizer, dtype, quantization=cfg.to_dict())
        native.publish(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst


def info(path: str | os.PathLike) -> dict:
    """What a checkpoint holds, without reading its tensors (nor verifying checksums): layout, ModelArgs,
    parameter count, dtype, tokenizer vocabulary, and the quantisation of a quantised one (else None)."""
    from llamaherd.checkpoint.native import read_quantization
    from llamaherd.model.args import num_params

    path = resolve(path)
    layout = detect(path)
    mod = _module(layout)
    args = mod.read_args(path)
    tok = _read_tokenizer(path, layout, args.vocab_size)
    qcfg = read_quantization(path) if layout == "herd" else None
    return {"path": str(path), "layout": layout, "model_args": args.to_dict(), "parameters": num_params(args),
            "dtype": mod.read_dtype(path), "tokenizer_vocab": tok.n_words if tok is not None else None,
            "quantization": qcfg.to_dict() if qcfg is not None else None}
