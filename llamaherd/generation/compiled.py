"""The one-token decode step: the model itself, or compiled, and the KV cache it runs over.

A decode step is ``step(tokens [B, 1], positions [1], kv_len) -> logits [B, 1, vocab]``, every row at
the same position with ``kv_len`` filled cache positions. With ``compile``, the cache and the compiled
step are kept between calls (per model), because building them costs seconds to a minute:

- on a GPU, ``torch.compile`` with CUDA graphs and coordinate-descent tuning, as gpt-fast does: each
  step replays one graph over the whole static cache, masked by position;
- on a CPU, the step exported with ``torch.export`` and compiled ahead of time by AOTInductor into
  a C++ library (see ``_cpu_step``); attention there is ``grouped_decode_attention``.

``clear_cache(model)`` frees what is kept.
"""

from __future__ import annotations

import os
import tempfile
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch

from llamaherd.errors import HerdError
from llamaherd.generation.cache import StaticKVCache, grouped_decode_attention

Step = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


@dataclass
class _Kept:
    cache: StaticKVCache
    step: Callable | None = None  # the torch.compile'd step over ``cache`` (GPU)


_KEPT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> _Kept
_LIBRARIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {shapes: AOTInductor library} (CPU)


def cache_length(total_len: int, max_seq_len: int, compiled: bool) -> int:
    """Positions in the KV cache. A compiled step (and its CUDA graph) is specialized to the cache's
    shape, so when ``compiled`` the length is rounded up to a power of two (at least 256, at most
    ``max_seq_len``) for other prompt and output lengths to reuse it. The extra positions are masked
    on a GPU and not read at all on a CPU."""
    if not compiled:
        return total_len
    return min(max_seq_len, max(256, 1 << (total_len - 1).bit_length()))


def decode_cache(model, batch: int, length: int, compiled: bool) -> StaticKVCache:
    """A KV cache for decoding ``batch`` rows: a new one, or when ``compiled`` the one kept for
    ``model`` (zeroed, same tensors) if it has the shape, so that its compiled step is reused."""
    w = model.tok_embeddings.weight
    if not compiled:
        return StaticKVCache(model.args, batch, length, w.dtype, w.device)
    kept = _KEPT.get(model)
    if kept is not None and kept.cache.matches(batch, length, w.dtype, w.device):
        kept.cache.reset()
        return kept.cache
    attend = grouped_decode_attention if w.device.type == "cpu" else None
    cache = StaticKVCache(model.args, batch, length, w.dtype, w.device, decode_attention=attend)
    _KEPT[model] = _Kept(cache)
    return cache


def kept_cache(model) -> StaticKVCache | None:
    """The KV cache compiled decoding keeps for ``model`` between calls (None if there is none)."""
    kept = _KEPT.get(model)
    return kept.cache if kept is not None else None


def clear_cache(model) -> None:
    """Free the KV cache (and, on a GPU, the compiled step bound to it) kept for ``model``."""
    _KEPT.pop(model, None)


class _DecodeStep(torch.nn.Module):
    """The model and its cache as one module to compile: tokens [B, 1] at ``positions`` [1] -> logits.

    ``visible`` [K] is the part of the cache the new tokens see, the K filled positions (the cache's
    1-D mask form): a tensor, so that export can keep K symbolic where a Python int would be baked in.
    None: the whole cache, masked by position (static shapes, as CUDA graphs need).
    """

    def __init__(self, model: torch.nn.Module, cache: StaticKVCache):
        super().__init__()
        self.model, self.cache = model, cache

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, visible: torch.Tensor | None = None):
        return self.model(tokens, positions, mask=visible, cache=self.cache)


def decode_step(model, cache: StaticKVCache, compile: bool) -> Step:
    """The one-token decode step over ``cache``: the model itself (eagerly), or compiled."""
    visible = torch.ones(cache.length, dtype=torch.bool, device=model.tok_embeddings.weight.device)
    if not compile or cache.length < 4:  # a cache of under 4 positions leaves nothing worth compiling
        return lambda tokens, positions, kv_len: model(tokens, positions, mask=visible[:kv_len], cache=cache)
    if visible.device.type == "cpu":
        return _cpu_step(model, cache, visible)
    kept = _KEPT[model]
    if kept.step is None:
        options = {"triton.cudagraphs": True, "coordinate_descent_tuning": True}
        kept.step = torch.compile(_DecodeStep(model, cache), fullgraph=True, dynamic=False, options=options)
    compiled = kept.step
    return lambda tokens, positions, kv_len: compiled(tokens, positions)


def _cpu_step(model, cache: StaticKVCache, visible: torch.Tensor) -> Step:
    """The decode step compiled ahead of time by AOTInductor: one call into a C++ library per token.

    Under ``torch.compile`` each step on a CPU pays ~2 ms of Python: guards on every weight and a
    Python call per generated kernel, about as much as reading the weights themselves. AOTInductor
    compiles the exported step, with a C++ wrapper, into a shared library. The number of filled
    cache positions is a symbolic size, so attention reads only those and every step runs the same
    library. The library's constants (weights, RoPE tables, KV cache) are not copied in: it is given
    pointers to the model's and the cache's own tensors before every call, so it always sees the
    current weights and fills this cache. One library is built per model, batch size, cache length and
    weight dtypes/strides.
    """
    step = _DecodeStep(model, cache)
    tensors = {**dict(step.named_parameters(remove_duplicate=False)), **dict(step.named_buffers())}
    key = (cache.batch, tuple((name, t.dtype, t.shape, t.stride()) for name, t in tensors.items()))
    built = _LIBRARIES.setdefault(model, {})
    if key not in built:
        from torch._inductor import aoti_compile_and_package, aoti_load_package, config

        # Up to length - 1 filled positions while decoding; a slice as long as the cache would be a
        # special case that export refuses to keep symbolic.
        filled = torch.export.Dim("kv_len", min=2, max=cache.length - 1)
        example = (torch.zeros(cache.batch, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long), visible[:2])
        shapes = {"tokens": None, "positions": None, "visible": {0: filled}}
        try:
            with torch.inference_mode(False), torch.no_grad():
                program = torch.export.export(step, example, dynamic_shapes=shapes)
                with (tempfile.TemporaryDirectory() as tmp,
                      config.patch({"aot_inductor.package_constants_in_so": False})):
                    package = aoti_compile_and_package(program, package_path=os.path.join(tmp, "step.pt2"))
                    built[key] = aoti_load_package(package)
        except Exception as e:  # e.g. no C++ compiler: say so in one line, the eager path still works
            first = (str(e).strip().splitlines() or [""])[0][:300]
            raise HerdError(f"generate: compiling the CPU decode step failed ({type(e).__name__}: {first}); "
                            "decode without compile") from e
    library = built[key]
    library.load_constants({name: tensors[name] for name in library.get_constant_fqns()},
                           check_full_update=True, user_managed=True)
    run = library.loader.boxed_run  # the package's __call__ re-flattens its arguments at every step (~0.2 ms)
    return lambda tokens, positions, kv_len: run([tokens, positions, visible[:kv_len]])[0]
