"""The herd layout, and the file helpers the other layouts share.

    herd.json          {"format": "llamaherd", "version": 1, "model_args": {...}, "dtype": "bfloat16"}
    model.safetensors  Meta's tensor names; a tied embedding is stored once (tok_embeddings.weight)
    tokenizer.model    the tiktoken rank file (absent for a model saved without a tokenizer)
    checksums.json     {file: {"bytes": n, "sha256": hex}} for every other file, verified on load
                       (written into the other layouts too, and verified there when present)

A weight-only quantised checkpoint (``herd quantize``) is this layout with one more entry in herd.json,
    "quantization": {"scheme": "int8" | "int4", "group_size": null | 32 | 64 | 128 | 256, "head": bool}
("head": the output head is quantised too), and each quantised linear's ``NAME.weight`` in
model.safetensors replaced by its plain quantised form (``llamaherd.model.quant``): int8 ``NAME.weight``
[out, in] and ``NAME.scales`` [out]; int4 ``NAME.weight`` uint8 [out, in / 2] (two 4-bit codes a byte,
the even input column high), ``NAME.scales`` and ``NAME.zeros`` [out, in / group_size]; scales and zeros
in "dtype", the dtype the model runs in.

Safetensors files are written here tensor by tensor (one converted tensor in memory at a time) and
read with ``safe_open``, whose tensors are memory-mapped copy-on-write views of the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from llamaherd.errors import HerdError
from llamaherd.model.args import ModelArgs

FORMAT, VERSION = "llamaherd", 1
CONFIG, WEIGHTS, TOKENIZER, CHECKSUMS = "herd.json", "model.safetensors", "tokenizer.model", "checksums.json"
FILES = f"{CONFIG} + {WEIGHTS}"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str | torch.dtype | None, where: str = "dtype") -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise HerdError(f"{where}: unknown dtype {name!r} (expected one of {', '.join(DTYPES)})")
    return DTYPES[name]


def read_json(file: Path) -> dict:
    """A JSON object from ``file``; a missing or malformed file is a one-line HerdError."""
    if not file.is_file():
        raise HerdError(f"{file}: file not found")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HerdError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise HerdError(f"{file}: expected a JSON object, found {type(data).__name__}")
    return data


def write_json(file: Path, data: dict) -> None:
    file.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def args_from(d: dict, file: Path) -> ModelArgs:
    """``ModelArgs(**d)``, with any problem reported against ``file``."""
    try:
        return ModelArgs(**d)
    except HerdError as e:
        raise HerdError(f"{file}: {e}") from None
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise HerdError(f"{file}: impossible model configuration ({e})") from None


# --- safetensors ---------------------------------------------------------------------------------

def read_safetensors(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a safetensors file, memory-mapped; a damaged file is a HerdError naming it."""
    from safetensors import SafetensorError, safe_open

    if not file.is_file():
        raise HerdError(f"{file}: file not found")
    try:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
    except SafetensorError as e:
        raise HerdError(f"{file}: not a readable safetensors file ({e}); is it truncated?") from None


def write_safetensors(file: Path, tensors: dict[str, torch.Tensor], dtype: torch.dtype | None = None,
                      transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> str:
    """Write ``tensors`` (cast to ``dtype``, after ``transform(name, t)``, which keeps shapes) one at a
    time, so memory holds one converted tensor; returns the file's sha256."""
    header, offset = {}, 0
    for name, t in tensors.items():
        dt = dtype if dtype is not None and t.is_floating_point() else t.dtype
        nbytes = t.numel() * dt.itemsize
        header[name] = {"dtype": _ST_DTYPES[dt], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # tensor data starts 8-byte aligned
    sha = hashlib.sha256()
    with open(file, "wb") as f:
        for chunk in (len(head).to_bytes(8, "little"), head):
            f.write(chunk)
            sha.update(chunk)
        for name, t in tensors.items():
            t = transform(name, t) if transform else t
            t = t.detach().to(device="cpu", dtype=_st_dtype(header[name]["dtype"])).contiguous()
            data = t.reshape(-1).view(torch.uint8).numpy()
            f.write(data)
            sha.update(data)
    return sha.hexdigest()


def _st_dtype(code: str) -> torch.dtype:
    return next(dt for dt, c in _ST_DTYPES.items() if c == code)


# --- checksums -----------------------------------------------------------------------------------

def sha256_file(file: Path) -> str:
    sha = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(1 << 22):
            sha.update(chunk)
    return sha.hexdigest()


def write_checksums(ckpt: Path, known: dict[str, str] | None = None) -> None:
    """``checksums.json`` for every file under ``ckpt``; ``known`` holds digests computed while writing."""
    known = known or {}
    files = sorted(p for p in ckpt.rglob("*") if p.is_file() and p.name != CHECKSUMS)
    sums = {}
    for p in files:
        rel = p.relative_to(ckpt).as_posix()
        sums[rel] = {"bytes": p.stat().st_size, "sha256": known.get(rel) or sha256_file(p)}
    write_json(ckpt / CHECKSUMS, sums)


def verify_checksums(ckpt: Path) -> None:
    """Every file listed in ``checksums.json`` exists with its size and sha256; HerdError otherwise."""
    manifest = read_json(ckpt / CHECKSUMS)
    for rel, want in manifest.items():
        file = ckpt / rel
        if not file.is_file():
            raise HerdError(f"{file}: file listed in {CHECKSUMS} is missing")
        if not isinstance(want, dict) or "sha256" not in want:
            raise HerdError(f"{ckpt / CHECKSUMS}: entry {rel!r} has no sha256")
        size = file.stat().st_size
        if "bytes" in want and size != want["bytes"]:
            raise HerdError(f"{file}: {size} bytes but {CHECKSUMS} says {want['bytes']} (truncated or replaced)")
        if sha256_file(file) != want["sha256"]:
            raise HerdError(f"{file}: sha256 does not match {CHECKSUMS} (the file is corrupt or was changed)")


def fsync_tree(root: Path) -> None:
    """Flush every file and directory under ``root`` to disk (before the rename that publishes it)."""
    for p in [*root.rglob("*"), root]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def publish(tmp: Path, path: Path) -> None:
    """Move the finished directory ``tmp`` to ``path``, replacing what is there: ``path`` never holds a
    half-written checkpoint, and everything is on disk before the rename that makes it visible."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it private
    fsync_tree(tmp)
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
        os.rename(path, old / "ckpt")
        os.rename(tmp, path)
        shutil.rmtree(old)
    else:
        os.rename(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- the herd layout -----------------------------------------------------------------------------

def read_args(ckpt: Path) -> ModelArgs:
    file = ckpt / CONFIG
    cfg = read_json(file)
    if cfg.get("format") != FORMAT:
        raise HerdError(f"{file}: format is {cfg.get('format')!r}, expected {FORMAT!r}")
    if cfg.get("version") != VERSION:
        raise HerdError(f"{file}: version {cfg.get('version')!r} is not supported (expected {VERSION})")
    if not isinstance(cfg.get("model_args"), dict):
        raise HerdError(f"{file}: 'model_args' is missing or not an object")
    try:
        return ModelArgs.from_dict(cfg["model_args"])
    except HerdError as e:
        raise HerdError(f"{file}: {e}") from None
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise HerdError(f"{file}: impossible model configuration ({e})") from None


def read_dtype(ckpt: Path) -> str:
    return str(read_json(ckpt / CONFIG).get("dtype"))


def read_quantization(ckpt: Path):
    """The ``QuantConfig`` of a quantised checkpoint (herd.json's "quantization"), or None for a float one."""
    from llamaherd.model.quant import config_from_dict

    file = ckpt / CONFIG
    cfg = read_json(file).get("quantization")
    return None if cfg is None else config_from_dict(cfg, str(file))


SHARDS = "dcp"  # a sharded checkpoint's weights: torch.distributed.checkpoint's files, one or more per rank


def read_tensors(ckpt: Path, args: ModelArgs) -> Iterator[tuple[str, torch.Tensor, str]]:
    if not (ckpt / WEIGHTS).is_file() and (ckpt / SHARDS / ".metadata").is_file():
        yield from read_shards(ckpt, args)
        return
    file = ckpt / WEIGHTS
    for name, t in read_safetensors(file):
        yield name, t, f"{file}: tensor {name}"


def read_shards(ckpt: Path, args: ModelArgs) -> Iterator[tuple[str, torch.Tensor, str]]:
    """The whole tensors of a sharded checkpoint (every rank's shards put together, in this one process)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from llamaherd.model.transformer import Transformer

    where = ckpt / SHARDS
    try:
        stored = dcp.FileSystemReader(where).read_metadata().state_dict_metadata
    except Exception as e:  # a damaged .metadata: torch raises various errors
        raise HerdError(f"{where}: cannot read the sharded checkpoint ({type(e).__name__}: {e})") from None
    with torch.device("meta"):
        names = [n for n, _ in Transformer(args).named_parameters()]  # a tied weight once
    state = {}
    for name in names:
        meta = stored.get(f"model.{name}")
        if not isinstance(meta, TensorStorageMetadata):
            raise HerdError(f"{where}: no tensor model.{name} in the sharded checkpoint")
        state[name] = torch.empty(meta.size, dtype=meta.properties.dtype)
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({"model": state}, checkpoint_id=where, no_dist=True)
    for name in names:
        yield name, state[name], f"{where}: tensor model.{name}"


def file_name(meta_name: str) -> str:
    return meta_name


def weights_label(ckpt: Path) -> str:
    return str(ckpt / WEIGHTS) if (ckpt / WEIGHTS).is_file() or not (ckpt / SHARDS).is_dir() else str(ckpt / SHARDS)


def read_tokenizer(ckpt: Path):
    from llamaherd.tokenizer import Tokenizer

    file = ckpt / TOKENIZER
    return (Tokenizer.from_file(file), file) if file.is_file() else None


def write(out: Path, args: ModelArgs, tensors: dict[str, torch.Tensor] | None, tokenizer, dtype: torch.dtype,
          quantization: dict | None = None) -> None:
    """Write the herd layout into ``out``; checksums.json last, covering every file in ``out``. ``tensors``
    None: the weights are already there as shards (``SHARDS``), written by every rank. ``quantization``:
    herd.json's entry for a quantised checkpoint, whose ``tensors`` are then in the quantised form."""
    sha = write_safetensors(out / WEIGHTS, tensors, dtype) if tensors is not None else None
    cfg = {"format": FORMAT, "version": VERSION, "model_args": args.to_dict(), "dtype": dtype_name(dtype)}
    if quantization is not None:
        cfg["quantization"] = quantization
    write_json(out / CONFIG, cfg)
    if tokenizer is not None:
        tokenizer.save(out / TOKENIZER)
    write_checksums(out, {WEIGHTS: sha} if sha else {})
