"""Text generation with a static KV cache: greedy, temperature, top-k, top-p; batches; streaming.

A batch of prompts of different lengths is decoded as in Meta's reference: the cache is filled
with the shortest prompt, then one position at a time for every row, where a row still inside its
own prompt takes the prompt's token instead of the sampled one. All rows share one position, so
one static cache and one causal mask serve the whole batch.
"""

from __future__ import annotations

import os
import tempfile
import weakref
from typing import Callable, Sequence

import torch

from llamaherd.errors import HerdError

_CHECK_EVERY = 8  # decode steps between checks for the end when no token is streamed
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its compiled decode step (GPU)
_LIBRARIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {shapes: AOTInductor library} (CPU)


def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, top_k: int | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token per row from logits [B, vocab]: argmax at temperature 0, else a filtered sample."""
    if temperature <= 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        cumulative = sorted_probs.cumsum(dim=-1)
        sorted_probs = sorted_probs.masked_fill(cumulative - sorted_probs > top_p, 0.0)  # keep the nucleus
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode(False)  # new weights must stay usable for training after generate()
@torch.no_grad()
def _cpu_decode_layout(model: torch.nn.Module) -> None:
    """Store each Linear weight [out, in] in the memory order that CPU decoding reads fastest.

    Same shapes and values; only the order changes. Decoding is a chain of matrix-vector products
    that read every weight once per token, and MKL's float32 product reads a matrix fastest along
    its longer side: the output head, w1, w3 and square matrices go 1.0-1.5x faster column-major
    (as the transpose of an [in, out] tensor), the narrow ones (w2, wk, wv at large dims) slower,
    and bfloat16 weights 20x slower (docs/benchmarks.md). So float32 matrices with out >= in are
    made column-major and every other one row-major (it may have been converted before a change of
    dtype). Prefill, training and saving work unchanged with either order.
    """
    for module in model.modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        w = module.weight
        if w.dtype == torch.float32 and w.shape[0] >= w.shape[1]:
            if w.is_contiguous():
                module.weight.data = w.data.t().contiguous().t()
        elif not w.is_contiguous():
            module.weight.data = w.data.contiguous()


def _cache_length(total_len: int, max_seq_len: int, compiled: bool) -> int:
    """Positions in the KV cache. A compiled step (and its CUDA graph) is specialized to the cache's
    shape, so when ``compiled`` the length is rounded up to a power of two (at least 256, at most
    ``max_seq_len``) for other prompt and output lengths to reuse it. The extra positions are masked
    on a GPU and not read at all on a CPU."""
    if not compiled:
        return total_len
    return min(max_seq_len, max(256, 1 << (total_len - 1).bit_length()))


class _DecodeStep(torch.nn.Module):
    """One decode step as a module to export: tokens [B, 1] at position ``input_pos`` [1] -> logits.

    ``filled`` is any tensor whose length is the number of filled cache positions (``kv_len``): a
    dimension that export can leave symbolic, where a Python int would be baked in.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor, filled: torch.Tensor) -> torch.Tensor:
        return self.model(tokens, input_pos=input_pos, kv_len=filled.shape[0])


def _cpu_decoder(model: torch.nn.Module, batch: int, cache_len: int) -> Callable:
    """The decode step compiled ahead of time by AOTInductor: one call into a C++ library per token.

    Under ``torch.compile`` each step on a CPU pays ~2 ms of Python: guards on every weight and a
    Python call per generated kernel, about as much as reading the weights themselves. AOTInductor
    compiles the exported step, with a C++ wrapper, into a shared library. The number of filled
    cache positions is a symbolic size, so attention reads only those (no mask) and every step runs
    the same library. The library's constants (weights, RoPE tables, KV cache) are not copied in:
    it is given pointers to the model's own tensors before every call, so it always sees the
    current weights and fills the model's cache. One library is built per model, batch size, cache
    length and weight dtypes/strides.
    """
    step = _DecodeStep(model)
    tensors = {**dict(step.named_parameters(remove_duplicate=False)), **dict(step.named_buffers())}
    key = (batch, tuple((name, t.dtype, t.shape, t.stride()) for name, t in tensors.items()))
    built = _LIBRARIES.setdefault(model, {})
    if key not in built:
        from torch._inductor import aoti_compile_and_package, aoti_load_package, config

        # Up to cache_len - 1 filled positions while decoding; a slice as long as the cache would be
        # a special case that export refuses to keep symbolic.
        filled = torch.export.Dim("kv_len", min=2, max=cache_len - 1)
        example = (torch.zeros(batch, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long), torch.zeros(2))
        shapes = {"tokens": None, "input_pos": None, "filled": {0: filled}}
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
    lengths = torch.empty(cache_len)
    return lambda tokens, input_pos, kv_len: run([tokens, input_pos, lengths[:kv_len]])[0]


def _decoder(model: torch.nn.Module, compile: bool, batch: int, cache_len: int) -> Callable:
    """The one-token decode step ``(tokens [B, 1], input_pos [1], kv_len) -> logits``: the model
    itself, or a compiled step.

    On a GPU, compiled as gpt-fast does: mode "reduce-overhead" (each step replays one CUDA graph
    over the whole static cache, masked) plus coordinate-descent tuning of the generated kernels'
    block sizes. On a CPU, ahead of time (see ``_cpu_decoder``); a cache of under 4 positions
    leaves nothing worth compiling.
    """
    if not compile or cache_len < 4:
        return model
    if model.tok_embeddings.weight.device.type == "cpu":
        return _cpu_decoder(model, batch, cache_len)
    if model not in _COMPILED:
        options = {"triton.cudagraphs": True, "coordinate_descent_tuning": True}
        _COMPILED[model] = torch.compile(model, fullgraph=True, dynamic=False, options=options)
    compiled = _COMPILED[model]
    return lambda tokens, input_pos, kv_len: compiled(tokens, input_pos=input_pos)


def _until_stop(ids: list[int], stops: set[int]) -> list[int]:
    """``ids`` up to and including the first stop token."""
    for n, t in enumerate(ids):
        if t in stops:
            return ids[: n + 1]
    return ids


@torch.inference_mode()
def generate(
    model,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int | None = None,
    seed: int | None = None,
    stop_tokens: Sequence[int] | None = None,
    on_token: Callable[[int, int], None] | None = None,
    compile: bool = False,
) -> list[list[int]]:
    """Continue each prompt (a list of token ids); return the new token ids per prompt.

    A row stops after ``max_new_tokens`` new tokens or at its first stop token (included in its
    output). ``on_token(row, token_id)`` is called for every new token as it is produced.
    ``compile`` decodes through a compiled step, CUDA graphs on a GPU and an AOTInductor library on a
    CPU (the first call compiles; see ``_decoder``); the KV cache then stays allocated between calls
    (``model.clear_cache()``).
    On CPU the first call stores some float32 weight matrices column-major in place (same values;
    see ``_cpu_decode_layout``).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise HerdError("generate: every prompt needs at least one token")
    if max_new_tokens < 1:
        raise HerdError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    if not (0.0 < top_p <= 1.0) or (top_k is not None and top_k < 1) or temperature < 0:
        raise HerdError(f"generate: need temperature >= 0, 0 < top_p <= 1, top_k >= 1; got "
                        f"{temperature}, {top_p}, {top_k}")
    max_seq_len = model.args.max_seq_len
    longest, shortest = max(len(p) for p in prompts), min(len(p) for p in prompts)
    if longest >= max_seq_len:
        raise HerdError(f"generate: a prompt of {longest} tokens does not fit the context of {max_seq_len} tokens "
                        "(it must leave room for at least one new token)")
    vocab = model.args.vocab_size
    if any(t < 0 or t >= vocab for p in prompts for t in p):
        raise HerdError(f"generate: prompt token ids must be in [0, {vocab})")

    device = model.tok_embeddings.weight.device
    batch, total_len = len(prompts), min(max_seq_len, longest + max_new_tokens)
    tokens = torch.zeros(batch, total_len, dtype=torch.long, device=device)
    in_prompt = torch.zeros(batch, total_len, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(list(p), dtype=torch.long, device=device)
        in_prompt[i, : len(p)] = True
    prompt_len = torch.tensor([len(p) for p in prompts], device=device)
    stop_set = set(stop_tokens or [])
    stops = torch.tensor(sorted(stop_set), dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None

    if device.type == "cpu":
        _cpu_decode_layout(model)
    cache_len = _cache_length(total_len, max_seq_len, compiled=compile)
    model.setup_cache(batch, cache_len)
    decode = _decoder(model, compile, batch, cache_len)
    try:
        positions = torch.arange(total_len, device=device)
        # [B, total_len]: where each row's new tokens go, after its prompt and up to max_new_tokens of them
        window = (positions >= prompt_len[:, None]) & (positions < (prompt_len + max_new_tokens)[:, None])
        at_limit = positions == (prompt_len + max_new_tokens - 1)[:, None]
        done = torch.zeros(batch, dtype=torch.bool, device=device)  # rows that stopped or reached their limit
        logits = model(tokens[:, :shortest], input_pos=positions[:shortest], kv_len=shortest, last_only=True)
        for cur in range(shortest, total_len):
            nxt = sample(logits[:, -1], temperature, top_p, top_k, generator)
            if cur < longest:  # a row still inside its prompt takes the prompt's token
                nxt = torch.where(in_prompt[:, cur], tokens[:, cur], nxt)
            tokens[:, cur] = nxt
            if stop_set or on_token is not None:  # otherwise every row simply runs to its limit
                new = window[:, cur] & ~done
                done |= new & (at_limit[:, cur] | torch.isin(nxt, stops))
                if on_token is not None:
                    for i in new.nonzero().flatten().tolist():
                        on_token(i, int(nxt[i]))
            # Reading `done` makes the host wait for the device, which then idles while the host
            # prepares the next step: without streaming, look only every few steps (tokens after
            # a row's stop are dropped below).
            check = on_token is not None or (cur - shortest) % _CHECK_EVERY == _CHECK_EVERY - 1
            if cur + 1 == total_len or (stop_set and check and bool(done.all())):
                break
            logits = decode(nxt[:, None].clone(), input_pos=positions[cur : cur + 1], kv_len=cur + 1)
        return [_until_stop(tokens[i, window[i]].tolist(), stop_set) for i in range(batch)]
    finally:
        if not compile:  # compiled decoding keeps its cache (and so its CUDA graph); model.clear_cache() frees it
            model.clear_cache()
