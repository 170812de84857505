"""Weight-only int8 and int4 quantisation of the transformer's linear layers, for decoding.

    >>> quantize(model, "int8")                  # the 7 linears of every block and the output head
    >>> quantize(model, "int4", group_size=128)  # the block linears; the output head stays in floating point

Decoding one token reads every weight once, so its time is about weight bytes / memory bandwidth:
int8 weights are half the bytes of bfloat16, int4 a quarter. Activations stay floating point
(weight-only): a layer computes x @ dequantise(W).T in one of torch's fused kernels, which read the
small integers and never materialise a floating-point weight.

- int8, symmetric per output channel: W[n, k] ~ q[n, k] * s[n] with q in [-127, 127] and
  s[n] = max_k |W[n, k]| / 127, so every weight is within s[n] / 2 of its value.
  Kernel: ``torch.ops.aten._weight_int8pack_mm(x, q, s)`` (CPU and CUDA).
- int4, asymmetric per group of ``group_size`` inputs, the form the tinygemm kernels take (and
  gpt-fast and torchao compute): W ~ (q - 8) * s + z with q in [0, 15], s = (max - min) / 15 and
  z = min + 8 s over each group. Kernels: ``_weight_int4pack_mm_for_cpu`` on a CPU and
  ``_weight_int4pack_mm`` on CUDA (bfloat16 activations), each on its own packed layout, built
  from the plain codes when the module is made.

Where a kernel is missing or fails a check on a tiny product (an older build, another device),
a module dequantises its weight and multiplies instead: correct, not fast.

The output head is quantised by default for int8 (with a 128K vocabulary it is 6% of an 8B model's
weights and read at every token) and kept in floating point for int4, whose coarser steps cost the
most accuracy there. The token embeddings are a lookup, not a product, and stay as they are.

The plain form, what a checkpoint stores (the same on every device), per quantised linear NAME:

    int8  NAME.weight int8 [out, in], NAME.scales [out]
    int4  NAME.weight uint8 [out, in / 2], two codes a byte, the even input column in the high
          4 bits; NAME.scales and NAME.zeros [out, in / group_size]

scales and zeros in the model's floating dtype. ``quantize_weight`` and ``quantize_state_dict``
compute it (pure functions); ``Int8Linear`` / ``Int4Linear`` are built from it.

This module sits in the model layer, beside transformer.py rather than in it: the checkpoint loader
(one layer up) rebuilds these modules from a quantised checkpoint, so they cannot live higher, and
the transformer itself knows nothing of them; ``quantize`` swaps its ``nn.Linear`` modules from
outside, as generation's ``prepare_for_decoding`` changes weights' memory order from outside.
"""

from __future__ import annotations

import functools
import re
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llamaherd.errors import HerdError

SCHEMES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128, 256)  # what both int4 kernels take
DEFAULT_GROUP_SIZE = 128
BLOCK_LINEARS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                 "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
_BLOCK_WEIGHT = re.compile(r"layers\.\d+\.(attention\.w[qkvo]|feed_forward\.w[123])\.weight")
_INT4_ROWS = 16  # the CPU int4 kernel takes a multiple of 16 output rows, CUDA's of 8: padded with zero rows
_ALIGN = 64  # bytes: where the CPU int8 kernel needs its operands to start (see Int8Linear)

__all__ = ["SCHEMES", "GROUP_SIZES", "QuantConfig", "Int8Linear", "Int4Linear", "quant_config", "quantize",
           "quantized", "quantize_weight", "quantize_state_dict", "quantize_int8", "quantize_int4",
           "dequantize_int8", "dequantize_int4", "pack_int4", "unpack_int4", "linear_names", "plain_shapes",
           "install"]


# --- what is quantised, and how ------------------------------------------------------------------

@dataclass(frozen=True)
class QuantConfig:
    """``scheme`` "int8" or "int4"; ``group_size`` inputs per int4 scale (None for int8); ``head``: the
    output head quantised too. As a dict it is the ``quantization`` entry of a herd checkpoint's herd.json."""

    scheme: str
    group_size: int | None
    head: bool

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        how = ("per output channel" if self.scheme == "int8" else f"groups of {self.group_size} inputs")
        head = "output head quantised" if self.head else "output head in floating point"
        return f"{self.scheme} weight-only, {how}, {head}"


def quant_config(scheme: str, group_size: int | None = None, head: bool | None = None) -> QuantConfig:
    """A checked ``QuantConfig``: int4's group size defaults to 128, ``head`` to True for int8 only."""
    if scheme not in SCHEMES:
        raise HerdError(f"unknown quantisation scheme {scheme!r} (expected one of {', '.join(SCHEMES)})")
    if scheme == "int8" and group_size is not None:
        raise HerdError(f"group size {group_size}: int8 has one scale per output channel; group sizes are for int4")
    if scheme == "int4":
        group_size = DEFAULT_GROUP_SIZE if group_size is None else group_size
        if group_size not in GROUP_SIZES:
            raise HerdError(f"int4 group size {group_size} is not supported "
                            f"(expected one of {', '.join(map(str, GROUP_SIZES))})")
    return QuantConfig(scheme, group_size, scheme == "int8" if head is None else bool(head))


def config_from_dict(d, where: str) -> QuantConfig:
    """The ``QuantConfig`` a checkpoint's ``quantization`` entry describes; HerdError naming ``where``."""
    if not isinstance(d, dict) or set(d) != {"scheme", "group_size", "head"} or not isinstance(d["head"], bool):
        raise HerdError(f"{where}: 'quantization' must be an object with scheme, group_size and head (a boolean), "
                        f"found {d!r}")
    try:
        cfg = quant_config(d["scheme"], d["group_size"], d["head"])
    except HerdError as e:
        raise HerdError(f"{where}: {e}") from None
    if cfg.group_size != d["group_size"]:
        raise HerdError(f"{where}: int4 'quantization' needs its group_size, found {d['group_size']!r}")
    return cfg


def linear_names(model: nn.Module, cfg: QuantConfig) -> list[str]:
    """The modules ``cfg`` quantises in ``model``: every block's 7 linears, then the head when ``cfg.head``."""
    names = [f"layers.{i}.{n}" for i in range(len(model.layers)) for n in BLOCK_LINEARS]
    return names + (["output"] if cfg.head else [])


def check_widths(model: nn.Module, cfg: QuantConfig) -> None:
    """HerdError unless int4's group size divides the input width of every linear it quantises."""
    if cfg.scheme != "int4":
        return
    for name in linear_names(model, cfg):
        width = model.get_submodule(name).in_features
        if width % cfg.group_size:
            raise HerdError(f"int4 group size {cfg.group_size} does not divide the input width {width} of {name} "
                            f"(choose a group size in {', '.join(map(str, GROUP_SIZES))} that divides it)")


def plain_shapes(model: nn.Module, cfg: QuantConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every plain-form tensor ``cfg`` makes of ``model``'s linears (e.g. a model on "meta")."""
    shapes = {}
    for name in linear_names(model, cfg):
        m = model.get_submodule(name)
        out, width = m.out_features, m.in_features
        if cfg.scheme == "int8":
            shapes |= {f"{name}.weight": (out, width), f"{name}.scales": (out,)}
        else:
            groups = (out, width // cfg.group_size)
            shapes |= {f"{name}.weight": (out, width // 2), f"{name}.scales": groups, f"{name}.zeros": groups}
    return shapes


# --- the pure functions: float weights -> the plain form, and back ----------------------------------

def quantize_int8(w: torch.Tensor, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes [out, in] and scales [out] (``dtype``, default w's) of w [out, in], symmetric per output channel.

    The codes are computed against the scales as stored, so |w - q * s| <= s / 2 for every element: with
    s = max |w| / 127, the largest |w| / s is at most 127 times (1 + the dtype's rounding error), < 127.5.
    """
    dtype = dtype or w.dtype
    wf = w.detach().float()
    scales = (wf.abs().amax(dim=1) / 127).clamp(min=torch.finfo(dtype).smallest_normal).to(dtype)
    q = torch.round(wf / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32 [out, in]: q * s per row."""
    return q.float() * scales.float()[:, None]


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Codes [out, in] in 0..15 -> uint8 [out, in / 2]: the even column in the high 4 bits (the byte order
    torch's CUDA int4 packing reads)."""
    q = q.to(torch.uint8)
    return (q[:, 0::2] << 4) | q[:, 1::2]


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [out, in / 2] -> codes uint8 [out, in]."""
    return torch.stack((packed >> 4, packed & 15), dim=-1).flatten(-2)


def quantize_int4(w: torch.Tensor, group_size: int, dtype: torch.dtype | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed codes uint8 [out, in / 2], scales and zeros [out, in / group_size] (``dtype``, default w's) of
    w [out, in]: asymmetric per group of ``group_size`` consecutive inputs, w ~ (q - 8) * s + z.

    s = (max - min) / 15 and z = min + 8 s per group, as torch's tinygemm kernels (and torchao) define them;
    the codes are computed against s and z as stored. In float32 every element is within s / 2 of its value.
    """
    dtype = dtype or w.dtype
    out, width = w.shape
    if width % group_size:
        raise HerdError(f"int4 group size {group_size} does not divide the input width {width}")
    wf = w.detach().float().reshape(out, width // group_size, group_size)
    lo, hi = wf.amin(dim=-1), wf.amax(dim=-1)
    scales = ((hi - lo) / 15).clamp(min=torch.finfo(dtype).smallest_normal).to(dtype)
    zeros = (lo + scales.float() * 8).to(dtype)
    s, z = scales.float()[..., None], zeros.float()[..., None]
    q = torch.round((wf - (z - s * 8)) / s).clamp(0, 15).reshape(out, width)
    return pack_int4(q), scales, zeros


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """float32 [out, in]: (q - 8) * s + z per group."""
    q = unpack_int4(packed).float()
    out, width = q.shape
    q = q.view(out, width // group_size, group_size)
    return ((q - 8) * scales.float()[..., None] + zeros.float()[..., None]).view(out, width)


def quantize_weight(w: torch.Tensor, cfg: QuantConfig, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The plain form of one linear's weight: {"weight", "scales"} (+ "zeros" for int4)."""
    if cfg.scheme == "int8":
        q, scales = quantize_int8(w, dtype)
        return {"weight": q, "scales": scales}
    packed, scales, zeros = quantize_int4(w, cfg.group_size, dtype)
    return {"weight": packed, "scales": scales, "zeros": zeros}


def quantize_state_dict(state: Mapping[str, torch.Tensor], cfg: QuantConfig, dtype: torch.dtype | None = None
                        ) -> dict[str, torch.Tensor]:
    """A model's weights (Meta's names, a tied head once as tok_embeddings.weight) -> the quantised checkpoint's:
    each quantised linear's ``NAME.weight`` replaced by its plain form, the other floating-point tensors cast
    to ``dtype`` (default: each tensor's own). With a tied head quantised, ``output.*`` is made from the
    embeddings, which stay as they are."""
    out = {}
    for name, t in state.items():
        if _BLOCK_WEIGHT.fullmatch(name) or (name == "output.weight" and cfg.head):
            prefix = name.removesuffix(".weight")
            out |= {f"{prefix}.{k}": v for k, v in quantize_weight(t, cfg, dtype or t.dtype).items()}
        else:
            out[name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    if cfg.head and "output.weight" not in state:  # tied: the head is the embedding matrix
        emb = state["tok_embeddings.weight"]
        out |= {f"output.{k}": v for k, v in quantize_weight(emb, cfg, dtype or emb.dtype).items()}
    return out


# --- the modules ---------------------------------------------------------------------------------

# our operator library: one op, the CPU int4 product (``torch.ops.herd_quant.int4_matmul``)
_OPS = torch.library.Library("herd_quant", "DEF")
_OPS.define("int4_matmul(Tensor x, Tensor weight, int group_size, Tensor scales_and_zeros) -> Tensor")


@torch.library.impl(_OPS, "int4_matmul", "CPU")
def _int4_matmul_cpu(x: torch.Tensor, weight: torch.Tensor, group_size: int,
                     scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """``aten._weight_int4pack_mm_for_cpu``, as an op of our own: a step compiled ahead of time calls torch's kernel
    as it is. (Inductor's lowering of the aten op makes the group size a tensor constant of the compiled library,
    which a library built to run on the model's own weights, as generation's CPU step is, is never given.)"""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, weight, group_size, scales_and_zeros)


@torch.library.register_fake(torch.ops.herd_quant.int4_matmul.default)
def _(x, weight, group_size, scales_and_zeros):
    return x.new_empty(x.shape[0], weight.shape[0])


int4_mm_cpu = torch.ops.herd_quant.int4_matmul


def _reference_product(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x.float() @ w.float().t()


@functools.cache
def _kernel_works(scheme: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this build's kernel for ``scheme`` runs on ``device`` with ``dtype`` activations and gives the
    dequantised product on a tiny example; warns when it runs but disagrees (the fallback is then used)."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(32, 64, generator=gen)
    x = torch.randn(2, 64, generator=gen)
    try:
        if scheme == "int8":
            q, s = quantize_int8(w, dtype)
            mod = Int8Linear(q.to(device), s.to(device), kernel=True)
            want = _reference_product(x, dequantize_int8(q, s))
        else:
            packed, s, z = quantize_int4(w, 32, dtype)
            mod = Int4Linear(packed.to(device), s.to(device), z.to(device), 32, kernel=True)
            want = _reference_product(x, dequantize_int4(packed, s, z, 32))
        got = mod(x.to(device=device, dtype=dtype)).float().cpu()
    except (RuntimeError, NotImplementedError, AttributeError):
        return False
    if not torch.allclose(got, want, rtol=0.02, atol=0.02 * want.abs().max().item()):
        warnings.warn(f"the {scheme} kernel on {device} ({dtype}) disagrees with the dequantised product; "
                      "dequantising instead", stacklevel=2)
        return False
    return True


def has_kernel(scheme: str, device, dtype: torch.dtype) -> bool:
    """Whether ``scheme``'s fused kernel is used on ``device`` for ``dtype`` activations (checked once)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type not in ("cpu", "cuda"):
        return False
    if scheme == "int4" and device.type == "cuda":
        dtype = torch.bfloat16  # the CUDA kernel's only activation dtype: others are cast to it
    return _kernel_works(scheme, device, dtype)


class Int8Linear(nn.Module):
    """A bias-free linear layer with int8 weights: y = x @ (q * s).T, q int8 [out, in], s [out].

    ``kernel``: whether ``forward`` calls ``_weight_int8pack_mm`` (default: where it works for this device
    and the scales' dtype); otherwise it multiplies by the int8 weight cast to x's dtype and scales the
    result, which under ``torch.compile`` fuses into one product too. Activations in the scales' dtype.

    torch's CPU kernel (2.13, AVX-512) reads both matrices with aligned vector loads and crashes the process
    on an input or weight that does not start on a 64-byte boundary, as a tensor memory-mapped from a
    checkpoint file or a slice of another tensor may not: a misaligned CPU weight is copied once here, and
    the input is copied at every call (one row per decoded token: microseconds), into fresh, aligned memory.
    """

    scheme, group_size = "int8", None

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, kernel: bool | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        if weight.device.type == "cpu" and weight.data_ptr() % _ALIGN:
            weight = weight.clone()  # fresh CPU tensors are 64-byte aligned
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)
        self.kernel = has_kernel("int8", weight.device, scales.dtype) if kernel is None else kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if self.kernel:
            x2 = x2.clone(memory_format=torch.contiguous_format) if x2.device.type == "cpu" else x2.contiguous()
            y = torch.ops.aten._weight_int8pack_mm(x2, self.weight, self.scales)
        else:
            y = F.linear(x2, self.weight.to(x.dtype)) * self.scales
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}"


class Int4Linear(nn.Module):
    """A bias-free linear layer with int4 weights in groups of ``group_size`` inputs, built from the plain form
    (packed codes uint8 [out, in / 2], scales and zeros [out, in / group_size]) on the device it will run on.

    ``layout`` is what ``weight`` holds: "cpu" or "cuda", the packed layout of that device's kernel
    (rows padded to a multiple of 16); or "plain", the plain codes, dequantised at every call where no
    kernel works (or ``kernel=False``). ``scales_and_zeros`` is [in / group_size, rows, 2] as the kernels
    take it, in the scales' dtype (bfloat16 on CUDA, whose kernel takes bfloat16 activations only; others
    are cast). The packed layouts are device-specific: quantise on the device that decodes.
    """

    scheme = "int4"

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                 kernel: bool | None = None):
        super().__init__()
        out, half = weight.shape
        self.out_features, self.in_features, self.group_size = out, half * 2, group_size
        device = weight.device
        if kernel is None:
            kernel = has_kernel("int4", device, scales.dtype)
        self.layout = device.type if kernel else "plain"
        sz = torch.stack((scales, zeros), dim=-1)  # [out, groups, 2]
        if self.layout != "plain" and out % _INT4_ROWS:
            rows = _INT4_ROWS - out % _INT4_ROWS  # zero scales and zeros: padded rows give 0, dropped after
            weight = torch.cat((weight, weight.new_zeros(rows, half)))
            sz = torch.cat((sz, sz.new_zeros(rows, *sz.shape[1:])))
        sz = sz.transpose(0, 1).contiguous()
        if self.layout == "cpu":
            weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_int4(weight).to(torch.int32), 1)
        elif self.layout == "cuda":
            tiles = next(t for t in (8, 4, 2) if self.in_features % (16 * t) == 0)
            weight = torch.ops.aten._convert_weight_to_int4pack(weight.contiguous(), tiles)
            sz = sz.to(torch.bfloat16)
        self.register_buffer("weight", weight)
        self.register_buffer("scales_and_zeros", sz)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        g, sz = self.group_size, self.scales_and_zeros
        if self.layout == "cpu":
            y = int4_mm_cpu(x2.to(sz.dtype).contiguous(), self.weight, g, sz)
        elif self.layout == "cuda":
            y = torch.ops.aten._weight_int4pack_mm(x2.to(sz.dtype).contiguous(), self.weight, g, sz)
        else:
            w = dequantize_int4(self.weight, sz[..., 0].t(), sz[..., 1].t(), g)
            y = F.linear(x2, w.to(x.dtype))
        return y[:, : self.out_features].to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"layout={self.layout}")


QUANTIZED = (Int8Linear, Int4Linear)


def _module(plain: Mapping[str, torch.Tensor], cfg: QuantConfig) -> nn.Module:
    if cfg.scheme == "int8":
        return Int8Linear(plain["weight"], plain["scales"])
    return Int4Linear(plain["weight"], plain["scales"], plain["zeros"], cfg.group_size)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    owner, _, attr = name.rpartition(".")
    setattr(model.get_submodule(owner) if owner else model, attr, module)


# --- whole models --------------------------------------------------------------------------------

def quantized(model: nn.Module) -> QuantConfig | None:
    """The quantisation ``model`` carries (from its modules), or None."""
    found = [m for m in model.modules() if isinstance(m, QUANTIZED)]
    if not found:
        return None
    return QuantConfig(found[0].scheme, found[0].group_size, isinstance(getattr(model, "output", None), QUANTIZED))


@torch.inference_mode(False)
@torch.no_grad()
def quantize(model: nn.Module, scheme: str = "int8", group_size: int | None = None, head: bool | None = None,
             dtype: torch.dtype | None = None) -> nn.Module:
    """Replace ``model``'s linear layers by int8 or int4 ones, in place, on the device the model is on; returns it.

    ``group_size``: int4's inputs per scale (32, 64, 128 or 256; default 128). ``head``: quantise the output
    head too (default: for int8 only). ``dtype``: the floating dtype the model then runs in (scales,
    embeddings, norms, an unquantised head; default the model's own); the weights are quantised from their
    current values, so quantising a float32 model to run in bfloat16 loses no extra precision. One layer
    at a time, so the float weights are freed as their quantised ones are made.
    """
    cfg = quant_config(scheme, group_size, head)
    done = quantized(model)
    if done is not None:
        raise HerdError(f"the model is already quantised ({done.describe()})")
    check_widths(model, cfg)
    dtype = dtype or model.tok_embeddings.weight.dtype
    for name in linear_names(model, cfg):
        plain = quantize_weight(model.get_submodule(name).weight, cfg, dtype)
        _replace(model, name, _module(plain, cfg))
    _cast_floats(model, dtype)
    return model


def _cast_floats(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the parameters of every module but the quantised ones to ``dtype``, keeping tied ones tied."""
    new: dict[int, nn.Parameter] = {}
    for m in model.modules():
        if isinstance(m, QUANTIZED):
            continue
        for key, p in m._parameters.items():
            if p is None or not p.is_floating_point() or p.dtype == dtype:
                continue
            if id(p) not in new:
                new[id(p)] = nn.Parameter(p.detach().to(dtype), requires_grad=p.requires_grad)
            m._parameters[key] = new[id(p)]


def install(model: nn.Module, tensors: Mapping[str, torch.Tensor], cfg: QuantConfig) -> nn.Module:
    """Put the quantised modules made from ``tensors`` (the plain form, already on their device, shapes checked
    against ``plain_shapes``) in ``model`` in place of its linears: what loading a quantised checkpoint does."""
    want = {"weight": torch.int8 if cfg.scheme == "int8" else torch.uint8}
    for name in linear_names(model, cfg):
        plain = {k.removeprefix(f"{name}."): t for k, t in tensors.items() if k.rpartition(".")[0] == name}
        for key, t in plain.items():
            if key in want and t.dtype != want[key]:
                raise HerdError(f"tensor {name}.{key} is {t.dtype}, but {cfg.scheme} weights are {want[key]}")
            if key not in want and not t.is_floating_point():
                raise HerdError(f"tensor {name}.{key} is {t.dtype}, expected a floating-point dtype")
        _replace(model, name, _module(plain, cfg))
    return model
