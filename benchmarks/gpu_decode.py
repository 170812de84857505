"""Batch-1 decoding on one GPU: llamaherd generate(compile=True) against Hugging Face generate, same weights.

The llama3-8b shape with seeded random weights in bfloat16, batch 1, a 16-token prompt, 256 new
greedy tokens (no stop token). Contenders:

  llamaherd compile=True   static KV cache, decode steps through torch.compile(mode="reduce-overhead")
  HF eager                 model.generate with its default dynamic cache, no compilation
  HF static + compile      cache_implementation="static" (transformers then compiles the forward itself)

Tokens/s counts new tokens over the whole generate call (prefill included); compilation happens in
untimed warm-up calls and is reported apart. Decoding one token reads every weight once, so
weight bytes x tokens/s is the memory bandwidth a contender achieves; a large device-to-device copy
measures what the GPU can do, and copy bandwidth / weight bytes is the ceiling in tokens/s.

Then, for each of --batches (default 64), ours alone decodes that many different prompts at once
(one generate call; tokens/s counts the new tokens of every row).

Checks before timing: the weight conversion is exact (float32 logits of a 2-layer model of the same
shape must match), and the bfloat16 models' logits and greedy tokens are compared (reported: in
bfloat16 the two rounding orders differ, so the tokens may part after a while).

    python benchmarks/gpu_decode.py --out bench-out/gpu_decode.json            # expected: about 4-5 minutes on one H100
    python benchmarks/gpu_decode.py --quick --out bench-out/gpu_decode.json    # expected: about 3 minutes
    python benchmarks/gpu_decode.py --device cpu --preset tiny --dtype float32 --no-compile --new-tokens 16  # smoke
"""

from __future__ import annotations

import argparse
import time

import torch
from common import (
    assert_same_logits,
    build_hf,
    build_ours,
    fmt_table,
    interleaved,
    machine,
    paired_ratio,
    print_machine,
    require_device,
    stats,
    timed,
    write_json,
)

from llamaherd.generation import generate
from llamaherd.model import preset

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def copy_bandwidth(device: str, gib: float, reps: int = 10) -> float:
    """Bytes per second moved by a device-to-device copy of ``gib`` GiB (read + write counted)."""
    nbytes = int(gib * 2**30)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)
    secs = timed(lambda: [dst.copy_(src) for _ in range(reps)])  # both are freed on return
    return 2 * nbytes * reps / secs


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())  # tied weights are counted once


def check_conversion(name: str, vocab: int | None, device: str) -> float:
    """Exact check of the weight conversion: float32 logits of a 2-layer model of the same shape."""
    over = {"n_layers": 2} if vocab is None else {"n_layers": 2, "vocab_size": vocab}
    args = preset(name, **over)
    ours = build_ours(args, seed=1, dtype=torch.float32, device=device).eval()
    hf = build_hf(ours)
    x = torch.randint(0, args.vocab_size, (1, 64), device=device, generator=torch.Generator(device).manual_seed(2))
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        diff = assert_same_logits(ours, hf, x, rtol=1e-4, atol_scale=1e-4)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    del ours, hf
    return diff


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama3-8b")
    p.add_argument("--vocab-size", type=int, default=None, help="override the preset's vocabulary size")
    p.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    p.add_argument("--device", default="cuda")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--reps", type=int, default=3, help="timed rounds (each runs every contender once)")
    p.add_argument("--copy-gib", type=float, default=2.0, help="size of the bandwidth-test copy")
    p.add_argument("--no-compile", action="store_true", help="llamaherd eager instead of compile=True")
    p.add_argument("--no-hf", action="store_true", help="skip every Hugging Face contender")
    p.add_argument("--no-hf-static", action="store_true", help="skip HF static cache + compile")
    p.add_argument("--batches", default="64", help="comma-separated larger batch sizes to time ours at ('' for none)")
    p.add_argument("--quick", action="store_true", help="128 new tokens and 1 timed round")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    a = p.parse_args()
    if a.quick:
        a.new_tokens, a.reps = min(a.new_tokens, 128), 1
    require_device(a.device)
    t_start = time.perf_counter()
    dtype, n = DTYPES[a.dtype], a.new_tokens

    info = machine()
    print_machine(info)
    over = {} if a.vocab_size is None else {"vocab_size": a.vocab_size}
    args = preset(a.preset, **over)
    print(f"config: preset {a.preset} (dim {args.dim}, {args.n_layers} layers, {args.n_heads}/{args.n_kv_heads} "
          f"heads, vocab {args.vocab_size}), {a.dtype}, batch 1, prompt {a.prompt_len}, {n} new tokens, greedy")
    result = {"benchmark": "gpu_decode", "machine": info, "config": vars(a), "checks": {}, "compile_warmup_s": {},
              "results": {}}

    if not a.no_hf:
        diff = check_conversion(a.preset, a.vocab_size, a.device)
        result["checks"]["float32_2layer_max_abs_diff"] = diff
        print(f"check: weight conversion exact (2-layer float32 logits, max |diff| {diff:.2e})")

    ours = build_ours(args, seed=0, dtype=dtype, device=a.device).eval()
    wbytes = weight_bytes(ours)
    prompt = torch.randint(0, args.vocab_size, (1, a.prompt_len), generator=torch.Generator().manual_seed(1))
    prompt = prompt.to(a.device)
    hf = build_hf(ours) if not a.no_hf else None
    if hf is not None:
        with torch.no_grad():
            lo = ours(prompt).float()
            lh = hf(input_ids=prompt, use_cache=False).logits.float()
        rel = ((lo - lh).abs().max() / lh.abs().max()).item()
        agree = (lo.argmax(-1) == lh.argmax(-1)).float().mean().item()
        result["checks"].update(logits_rel_max_diff=rel, prompt_argmax_agreement=agree)
        print(f"check: {a.dtype} logits max |diff| / max |logit| = {rel:.3f}, argmax agreement {agree:.0%}")
        del lo, lh

    bw = copy_bandwidth(a.device, a.copy_gib)
    ceiling = bw / wbytes
    result.update(weight_bytes=wbytes, copy_bandwidth_bytes_per_s=bw, ceiling_tok_per_s=ceiling)
    print(f"weights {wbytes / 1e9:.2f} GB; copy bandwidth {bw / 1e12:.2f} TB/s -> ceiling {ceiling:.1f} tok/s")

    # --- contenders, each warmed up (compiled) before the timed rounds ---------------------------
    ids = prompt[0].tolist()
    compile_ours = not a.no_compile
    ours_name = "llamaherd compile=True" if compile_ours else "llamaherd eager"

    def run_ours():  # not streamed (no on_token), as HF's generate is called without a streamer
        return generate(ours, [ids], max_new_tokens=n, compile=compile_ours)[0]

    def run_hf(**kw):
        with torch.inference_mode():
            out = hf.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                              min_new_tokens=n, max_new_tokens=n, pad_token_id=0, **kw)
        return out[0, a.prompt_len:].tolist()

    contenders, tokens = {}, {}
    t0 = time.perf_counter()
    tokens[ours_name] = run_ours()
    result["compile_warmup_s"][ours_name] = time.perf_counter() - t0
    print(f"warm-up {ours_name}: {time.perf_counter() - t0:.1f}s (first call, compilation included)")
    contenders[ours_name] = run_ours
    if hf is not None:
        peers = {"HF eager": {}}
        if not a.no_hf_static:
            peers["HF static + compile"] = {"cache_implementation": "static"}
        for name, kw in peers.items():
            try:
                t0 = time.perf_counter()
                tokens[name] = run_hf(**kw)
                if kw:
                    run_hf(**kw)  # second call: compiled graphs recorded, caches reallocated
                result["compile_warmup_s"][name] = time.perf_counter() - t0
                print(f"warm-up {name}: {time.perf_counter() - t0:.1f}s")
            except Exception as e:  # a peer configuration that fails is reported, not fatal
                print(f"skip {name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                continue
            contenders[name] = lambda kw=kw: run_hf(**kw)
    ref = tokens[ours_name]
    for name, toks in tokens.items():
        if name != ours_name:
            same = next((i for i, (x, y) in enumerate(zip(ref, toks)) if x != y), min(len(ref), len(toks)))
            result["checks"][f"greedy_tokens_agree_{name}"] = same
            print(f"check: {name} greedy tokens agree with ours for the first {same} of {n}")

    times = interleaved(contenders, reps=a.reps, warmup=0)

    base = "HF eager" if "HF eager" in times else ours_name
    rows = []
    for name, ts in times.items():
        s = stats(ts)
        tps = n / s["median"]
        r = paired_ratio(times[base], ts)
        rows.append([name, f"{tps:.1f}", f"{n / s['max']:.1f}-{n / s['min']:.1f}", f"{wbytes * tps / 1e12:.2f}",
                     f"{tps / ceiling:.0%}", f"{r['median']:.2f}x ({r['min']:.2f}-{r['max']:.2f})"])
        result["results"][name] = {"seconds": ts, "tok_per_s_median": tps, "effective_bandwidth_bytes_per_s":
                                   wbytes * tps, "fraction_of_ceiling": tps / ceiling, f"speedup_vs_{base}": r}
    print()
    print(fmt_table(["", "tok/s (median)", "tok/s (min-max)", "effective TB/s", "of ceiling",
                     f"speed vs {base} (paired)"], rows))
    print(f"ceiling: copy bandwidth {bw / 1e12:.2f} TB/s / {wbytes / 1e9:.2f} GB of weights = {ceiling:.1f} tok/s")
    write_json(a.out, result)  # the batch-1 numbers are kept if a larger batch is cut off or fails

    result["batch_results"] = {}
    for size in [int(b) for b in a.batches.split(",") if b.strip()]:
        gen = torch.Generator().manual_seed(size)
        rows_b = torch.randint(0, args.vocab_size, (size, a.prompt_len), generator=gen).tolist()

        def run_batch(rows_b=rows_b):
            return generate(ours, rows_b, max_new_tokens=n, compile=compile_ours)

        try:
            t0 = time.perf_counter()
            got = run_batch()
            warm = time.perf_counter() - t0
            assert all(len(r) == n for r in got), f"batch {size}: every row must get {n} new tokens"
            ts = interleaved({"batch": run_batch}, reps=a.reps, warmup=0)["batch"]
        except Exception as e:  # e.g. out of memory: reported, the rest is kept
            print(f"batch {size}: FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            result["batch_results"][str(size)] = {"error": f"{type(e).__name__}: {e}"}
            continue
        med = stats(ts)["median"]
        result["batch_results"][str(size)] = {"seconds": ts, "first_call_s": warm, "tok_per_s_median": size * n / med,
                                              "tok_per_s_per_row": n / med}
        print(f"{ours_name}, batch {size}: {size * n / med:,.0f} tok/s ({n / med:.1f} per row; first call {warm:.1f}s)")
    if a.device.startswith("cuda"):
        result["max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated()
    result["total_wall_s"] = time.perf_counter() - t_start
    print(f"total wall time {result['total_wall_s']:.0f}s")
    write_json(a.out, result)


if __name__ == "__main__":
    main()
