"""Text generation with a static KV cache: greedy, temperature, top-k, top-p; batches; streaming.

A batch of prompts of different lengths is decoded as in Meta's reference: the cache is filled
with the shortest prompt, then one position at a time for every row, where a row still inside its
own prompt takes the prompt's token instead of the sampled one. All rows share one position, so
one static cache and one causal mask serve the whole batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from llamaherd.errors import HerdError
from llamaherd.generation.compiled import cache_length, decode_cache, decode_step
from llamaherd.generation.speculative import check_draft, distribution, speculative_row
from llamaherd.model.masks import causal_mask

_CHECK_EVERY = 8  # decode steps between checks for the end when no token is streamed


def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, top_k: int | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token per row from logits [B, vocab]: argmax at temperature 0, else a filtered sample."""
    if temperature <= 0.0:
        return logits.argmax(dim=-1)
    probs = distribution(logits, temperature, top_p, top_k, normalize=False)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode(False)  # new weights must stay usable for training afterwards
@torch.no_grad()
def prepare_for_decoding(model: torch.nn.Module) -> torch.nn.Module:
    """Store the model's weights in the memory order that decoding on its device reads fastest; returns it.

    An explicit step (``herd generate``, ``herd chat`` and ``herd run``'s samples take it); ``generate()``
    itself never changes the model. Same shapes and values; only the order changes, and only on a CPU.
    Decoding is a chain of matrix-vector products that read every weight once per token, and MKL's
    float32 product reads a matrix fastest along its longer side: the output head, w1, w3 and square
    matrices go 1.0-1.5x faster column-major (as the transpose of an [in, out] tensor), the narrow ones
    (w2, wk, wv at large dims) slower, and bfloat16 weights 20x slower (docs/benchmarks.md). So float32
    matrices with out >= in are made column-major and every other one row-major (it may have been
    converted before a change of dtype). Prefill, training and saving work unchanged with either order.
    """
    for module in model.modules():
        if not isinstance(module, torch.nn.Linear) or module.weight.device.type != "cpu":
            continue
        w = module.weight
        if w.dtype == torch.float32 and w.shape[0] >= w.shape[1]:
            if w.is_contiguous():
                module.weight.data = w.data.t().contiguous().t()
        elif not w.is_contiguous():
            module.weight.data = w.data.contiguous()
    return model


def load_for_decoding(checkpoint, *, device=None, dtype=None, quant: str | None = None,
                      group_size: int | None = None):
    """(model, tokenizer) of ``checkpoint`` ready to decode, as ``herd generate``, ``herd chat`` and ``herd serve``
    load it: on ``device`` (default: cuda when available), in ``dtype`` (a torch dtype or its name; default
    bfloat16 on a GPU, the checkpoint's own on a CPU), with ``quant`` ("int8" / "int4", ``group_size`` for int4)
    its linear layers' weights quantised as it loads, and its weights in the order decoding reads fastest.

    A checkpoint ``herd quantize`` wrote loads quantised by itself; ``quant`` then must name its scheme. The
    int8 / int4 kernels are fastest with bfloat16 activations, on a CPU too: a quantised model runs in
    ``dtype`` or else bfloat16, and on a CPU its float weights load as they are and are quantised from them."""
    from llamaherd.checkpoint import load
    from llamaherd.model.quant import quantize, quantized

    if quant is not None and quant not in ("int8", "int4"):
        raise HerdError(f"quantisation {quant!r}: expected int8 or int4")
    if group_size is not None and quant != "int4":
        raise HerdError(f"--group-size {group_size} applies to --quant int4 only")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(dtype, str):
        if dtype not in ("float32", "bfloat16", "float16"):
            raise HerdError(f"dtype {dtype!r}: expected float32, bfloat16 or float16")
        dtype = getattr(torch, dtype)
    dtype = dtype or (torch.bfloat16 if torch.device(device).type == "cuda" else None)
    on_cpu = torch.device(device).type == "cpu"
    model, tokenizer = load(checkpoint, device=device, dtype=None if quant and on_cpu else dtype)
    if quant:
        have = quantized(model)
        if have is None:
            quantize(model, quant, group_size, dtype=dtype or torch.bfloat16)
        elif have.scheme != quant or group_size not in (None, have.group_size):
            raise HerdError(f"{checkpoint}: is already quantised ({have.describe()}); drop --quant, or load the "
                            "float checkpoint to quantise it otherwise")
    return prepare_for_decoding(model), tokenizer


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
    on_token: Callable[[int, int], bool | None] | None = None,
    compile: bool = False,
    draft_model=None,
    draft_tokens: int = 4,
    stats: dict | None = None,
) -> list[list[int]]:
    """Continue each prompt (a list of token ids); return the new token ids per prompt.

    A row stops after ``max_new_tokens`` new tokens or at its first stop token (included in its
    output). ``on_token(row, token_id)`` is called for every new token as it is produced; when it returns
    a true value, that row ends there (that token is its last).
    ``compile`` decodes through a compiled step, CUDA graphs on a GPU and an AOTInductor library on a
    CPU (the first call compiles; see ``llamaherd.generation.compiled``); the KV cache then stays
    allocated between calls (``clear_cache(model)`` frees it). The model is not changed; on a CPU,
    ``prepare_for_decoding(model)`` first makes decoding faster.

    ``draft_model`` (a smaller model with the same vocabulary) decodes speculatively: it proposes
    ``draft_tokens`` tokens a round and ``model`` checks them in one forward (``speculative.py``). Greedy
    output is the same as without it; sampled output has the same distribution. Rows are then decoded one
    after another; ``stats``, when given, receives ``proposed``, ``accepted``, ``rounds`` and
    ``acceptance`` (accepted / proposed).
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

    if draft_model is not None:
        return _speculative(model, draft_model, prompts, max_new_tokens, temperature, top_p, top_k, seed,
                            stop_tokens, on_token, compile, draft_tokens, stats)
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

    cache = decode_cache(model, batch, cache_length(total_len, max_seq_len, compiled=compile), compile)
    decode = decode_step(model, cache, compile)
    positions = torch.arange(total_len, device=device)
    # [B, total_len]: where each row's new tokens go, after its prompt and up to max_new_tokens of them
    window = (positions >= prompt_len[:, None]) & (positions < (prompt_len + max_new_tokens)[:, None])
    at_limit = positions == (prompt_len + max_new_tokens - 1)[:, None]
    done = torch.zeros(batch, dtype=torch.bool, device=device)  # rows that stopped or reached their limit
    cut: list[int | None] = [None] * batch  # rows that on_token ended: how many new tokens they keep
    prefill = positions[:shortest]
    logits = model(tokens[:, :shortest], prefill, mask=causal_mask(prefill, shortest), cache=cache, last_only=True)
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
                    if on_token(i, int(nxt[i])):
                        done[i], cut[i] = True, cur + 1 - int(prompt_len[i])
        # Reading `done` makes the host wait for the device, which then idles while the host
        # prepares the next step: without streaming, look only every few steps (tokens after
        # a row's stop are dropped below).
        check = on_token is not None or (cur - shortest) % _CHECK_EVERY == _CHECK_EVERY - 1
        if cur + 1 == total_len or ((stop_set or on_token is not None) and check and bool(done.all())):
            break
        logits = decode(nxt[:, None].clone(), positions[cur : cur + 1], cur + 1)
    return [_until_stop(tokens[i, window[i]].tolist()[: cut[i]], stop_set) for i in range(batch)]


def _speculative(model, draft, prompts, max_new_tokens, temperature, top_p, top_k, seed, stop_tokens, on_token,
                 compile, draft_tokens, stats) -> list[list[int]]:
    """``generate`` with a draft model: each row on its own, see ``speculative.py``."""
    check_draft(model, draft)
    if compile:
        raise HerdError("generate: compile with a draft model is not supported; expected compile=False")
    if draft_tokens < 1:
        raise HerdError(f"generate: draft_tokens {draft_tokens}: expected 1 or more tokens a round")
    device = model.tok_embeddings.weight.device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    counts = {"proposed": 0, "accepted": 0, "rounds": 0}
    out = []
    for row, prompt in enumerate(prompts):
        hook = None if on_token is None else (lambda tok, row=row: on_token(row, tok))
        out.append(speculative_row(model, draft, list(prompt), max_new_tokens, k=draft_tokens,
                                   temperature=temperature, top_p=top_p, top_k=top_k, generator=generator,
                                   stops=set(stop_tokens or []), on_token=hook, stats=counts))
    if stats is not None:
        stats.update(counts, acceptance=counts["accepted"] / counts["proposed"] if counts["proposed"] else None)
    return out
