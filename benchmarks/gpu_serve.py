"""Serving on one GPU: `herd serve`'s server, measured through HTTP, against vLLM on the same card.

The llama3-8b shape with seeded random weights in bfloat16, and a synthetic tokenizer of Llama 3's size
(the 256 single bytes, then printable two- and three-byte strings up to 128,000 ranks, then Llama 3's 256
special tokens: 128,256 ids, so that every id the model can generate decodes to text). Every request is
a streamed /v1/chat/completions request (a short, distinct user message), greedy (temperature 0), with
``ignore_eos`` so that it generates exactly ``--tokens`` tokens (128). Two loads:

  batch 1          one request at a time (after one untimed request): tokens/s = completion tokens / wall
                   time of the request (time to first token included), and time to first token;
                   target: 170 tok/s or more on one H100/H200
  64 concurrent    64 requests sent at once (after an untimed round of short ones): aggregate generated
                   tokens/s over the round's wall time, time to first token (TTFT), the gaps between
                   streamed chunks (ITL) and each request's time per output token after its first (TPOT),
                   p50 / p99

Contenders:

  llamaherd   llamaherd.serve.app.running_server in this process (uvicorn in a thread, the engine's loop in
              another), max_batch 64, a paged KV cache of --kv-blocks blocks of 16; compile=True (the
              engine's forward through torch.compile, compiled by its warm-up before the server listens:
              reported apart as the build time); --no-compile for eager
  vLLM        when `vllm` is installed: its OpenAI server (python -m vllm.entrypoints.openai.api_server) as a
              process of its own, on the same weights and tokenizer saved in the Hugging Face layout
              (llamaherd.checkpoint.save(layout="hf")), --max-num-seqs 64, otherwise its defaults; started
              after our server has stopped and its GPU memory has been freed. Not installed: the JSON says so

The load generator is one asyncio loop of httpx requests, in a process of its own for both servers, so that
it takes no time from the server's process. The copy-bandwidth ceiling (gpu_decode.py's copy_bandwidth:
device-to-device copy bandwidth / weight bytes) is the most tokens/s batch-1 decoding can reach.

    python benchmarks/gpu_serve.py --out bench-out/gpu_serve.json           # expected: 4-6 minutes on one H100
    python benchmarks/gpu_serve.py --quick --out bench-out/gpu_serve.json   # at most ~150 s (--budget 140):
                                                                            # vLLM is left out if it is not
                                                                            # serving in time
    python benchmarks/gpu_serve.py --device cpu --preset tiny --dtype float32 --no-compile --quick   # smoke
                                   # test: a byte-level tokenizer (a small vocabulary), about half a minute
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.metadata
import importlib.util
import itertools
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch
from common import build_ours, fmt_table, machine, print_machine, require_device, write_json
from gpu_decode import copy_bandwidth, weight_bytes

from llamaherd.model import preset
from llamaherd.tokenizer import Tokenizer

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
TARGET_TOK_S = 170  # batch-1 decode through the server, llama3-8b bf16, one H100/H200
LLAMA3_RANKS = 128_000  # Llama 3's tokenizer: 128,000 ranks + 256 special tokens
NAME = "bench"  # the model name both servers serve


def synthetic_tokenizer(llama3_size: bool) -> Tokenizer:
    """Llama 3's size: the 256 single bytes, then printable ASCII strings of two and three bytes in a fixed
    order up to 128,000 ranks (128,256 ids with the special tokens). Otherwise byte-level (512 ids)."""
    ranks = {bytes([i]): i for i in range(256)}
    if llama3_size:
        printable = bytes(range(0x20, 0x7F))
        strings = itertools.chain.from_iterable(itertools.product(printable, repeat=n) for n in (2, 3))
        for s in itertools.islice(strings, LLAMA3_RANKS - len(ranks)):
            ranks[bytes(s)] = len(ranks)
    return Tokenizer.from_ranks(ranks)


# --- the load generator (run in a process of its own: --client-plan) --------------------------------------

async def _request(http, prompt: str, tokens: int) -> dict:
    """One streamed chat request: its completion tokens (the usage the server reports), wall time, time to
    first token and the gaps between content chunks."""
    body = {"model": NAME, "messages": [{"role": "user", "content": prompt}], "max_tokens": tokens,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    t0, stamps, usage = time.perf_counter(), [], None
    async with http.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:300]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"error event: {chunk['error']}")
            if chunk.get("usage"):
                usage = chunk["usage"]["completion_tokens"]
            choices = chunk.get("choices") or []
            if choices and (choices[0].get("delta") or {}).get("content"):
                stamps.append(time.perf_counter())
    wall = time.perf_counter() - t0
    return {"tokens": usage if usage is not None else len(stamps), "wall_s": wall,
            "ttft_s": stamps[0] - t0 if stamps else None, "last_s": stamps[-1] - t0 if stamps else None,
            "gaps_s": [b - a for a, b in zip(stamps, stamps[1:])]}


async def client(plan: dict) -> dict:
    """Batch 1 (one untimed request, then the timed ones in turn), then concurrent (an untimed round of short
    requests, then the timed round)."""
    import httpx

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=plan["url"], timeout=600, limits=limits) as http:
        one = plan["single"]
        await _request(http, "warm-up: " + one["prompts"][0], one["tokens"])
        single = [await _request(http, p, one["tokens"]) for p in one["prompts"]]
        many = plan["concurrent"]
        await asyncio.gather(*(_request(http, "warm-up: " + p, many["warmup_tokens"]) for p in many["prompts"]))
        t0 = time.perf_counter()
        requests = await asyncio.gather(*(_request(http, p, many["tokens"]) for p in many["prompts"]))
        wall = time.perf_counter() - t0
    return {"single": single, "concurrent": {"wall_s": wall, "requests": requests}}


def run_client(plan: dict, tmp: Path, timeout: float) -> dict:
    """``client(plan)`` in a process of its own (this script with --client-plan); its results."""
    plan_file, out_file = tmp / "plan.json", tmp / "client.json"
    plan_file.write_text(json.dumps(plan))
    out_file.unlink(missing_ok=True)
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--client-plan", str(plan_file),
                           "--client-out", str(out_file)], capture_output=True, text=True, timeout=max(timeout, 1))
    if proc.returncode != 0:
        raise RuntimeError(f"the load generator failed (exit status {proc.returncode}): "
                           + " | ".join(proc.stderr.strip().splitlines()[-5:]))
    return json.loads(out_file.read_text())


# --- statistics ----------------------------------------------------------------------------------------

def pct(xs: list[float], q: float) -> float | None:
    """The q-th percentile of ``xs`` (linear interpolation), None for no values."""
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def _tpot(r: dict) -> float | None:
    """Seconds per output token after the first."""
    if r["ttft_s"] is None or r["tokens"] < 2 or r["last_s"] <= r["ttft_s"]:
        return None
    return (r["last_s"] - r["ttft_s"]) / (r["tokens"] - 1)


def _latencies(requests: list[dict]) -> dict:
    gaps = [g for r in requests for g in r["gaps_s"]]
    out = {}
    for name, xs in (("ttft", [r["ttft_s"] for r in requests]), ("itl", gaps),
                     ("tpot", [_tpot(r) for r in requests])):
        for q in (50, 99):
            v = pct(xs, q)
            out[f"{name}_ms_p{q}"] = None if v is None else v * 1e3
    return out


def summarize(raw: dict, tokens: int) -> dict:
    single, conc = raw["single"], raw["concurrent"]
    rates = [r["tokens"] / r["wall_s"] for r in single]
    decode = [(r["tokens"] - 1) / (r["last_s"] - r["ttft_s"]) for r in single
              if r["ttft_s"] is not None and r["tokens"] > 1 and r["last_s"] > r["ttft_s"]]
    done = [r["tokens"] for r in single + conc["requests"]]
    return {
        "batch1": {"requests": len(single), "tok_per_s_median": pct(rates, 50), "tok_per_s_min": min(rates),
                   "tok_per_s_max": max(rates), "decode_tok_per_s_after_first_median": pct(decode, 50),
                   **_latencies(single)},
        "concurrent": {"requests": len(conc["requests"]), "wall_s": conc["wall_s"],
                       "tokens": sum(r["tokens"] for r in conc["requests"]),
                       "tok_per_s": sum(r["tokens"] for r in conc["requests"]) / conc["wall_s"],
                       **_latencies(conc["requests"])},
        "every_request_generated_all_tokens": all(n == tokens for n in done),
        "completion_tokens_min_max": [min(done), max(done)],
    }


# --- vLLM ------------------------------------------------------------------------------------------------

def _get_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group started for ``proc`` (vLLM's engine runs in child processes), then SIGKILL."""
    if proc.poll() is None:
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # children left behind by a leader that exited
    except (ProcessLookupError, PermissionError):
        pass


def _tail(log: Path, n: int = 8) -> str:
    try:
        return " | ".join(log.read_text(errors="replace").strip().splitlines()[-n:])
    except OSError:
        return ""


def measure_vllm(ckpt: Path, tmp: Path, plan: dict, a, left) -> dict:
    """vLLM's OpenAI server on ``ckpt``, the same load as ours; what it gave (or why it did not)."""
    from llamaherd.serve.app import free_port

    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(ckpt),
           "--served-model-name", NAME, "--host", "127.0.0.1", "--port", str(port), "--dtype", a.dtype,
           "--max-num-seqs", str(a.concurrency), "--seed", "0", *shlex.split(a.vllm_args)]
    out = {"version": importlib.metadata.version("vllm"),
           "args": [c if c != str(ckpt) else "<checkpoint>" for c in cmd[3:]]}
    log = tmp / "vllm.log"
    url = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while not _get_ok(url + "/v1/models"):
            if proc.poll() is not None:
                out["error"] = f"vLLM exited with status {proc.returncode} before serving: {_tail(log)}"
                return out
            if left() < a.load_reserve:
                out["error"] = (f"vLLM was not serving after {time.perf_counter() - t0:.0f} s, when the time budget "
                                f"(--budget {a.budget:g} s; --quick sets 140) ran out: run without it for vLLM")
                out["log_tail"] = _tail(log)
                return out
            time.sleep(1)
        out["start_s"] = time.perf_counter() - t0
        print(f"vLLM {out['version']} serving after {out['start_s']:.1f}s (load, compilation, CUDA graphs)",
              flush=True)
        raw = run_client({**plan, "url": url}, tmp, left())
        out.update(summarize(raw, plan["single"]["tokens"]))
        return out
    except Exception as e:  # vLLM is a peer: its failure is reported, ours stands
        out["error"] = f"{type(e).__name__}: {e}"
        out["log_tail"] = _tail(log)
        return out
    finally:
        _stop(proc)


# --- main ---------------------------------------------------------------------------------------------

def _ms(s: dict, name: str) -> str:
    p50, p99 = s.get(f"{name}_ms_p50"), s.get(f"{name}_ms_p99")
    return "-" if p50 is None else f"{p50:.1f} / {p99:.1f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama3-8b",
                   help="model shape; a preset with Llama 3's vocabulary gets the synthetic 128,256-id tokenizer, "
                        "a smaller one the byte-level tokenizer (512 ids)")
    p.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    p.add_argument("--device", default="cuda")
    p.add_argument("--tokens", type=int, default=128, help="generated tokens per request (ignore_eos)")
    p.add_argument("--requests", type=int, default=5, help="timed batch-1 requests (one at a time)")
    p.add_argument("--concurrency", type=int, default=64, help="requests at once; also max_batch / --max-num-seqs")
    p.add_argument("--warmup-tokens", type=int, default=16, help="tokens per request of the untimed concurrent round")
    p.add_argument("--kv-blocks", type=int, default=2048, help="our KV cache, in blocks of --block-size tokens")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--copy-gib", type=float, default=None, help="size of the bandwidth-test copy (default: 2 "
                                                                 "on a GPU, 0.25 on the CPU)")
    p.add_argument("--no-compile", action="store_true", help="our engine eager instead of compile=True")
    p.add_argument("--no-vllm", action="store_true", help="skip vLLM")
    p.add_argument("--vllm-args", default="", help="more arguments for vLLM's server, e.g. '--enforce-eager'")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds the whole run may take (--quick: 140); vLLM is left out or stopped when its "
                        "turn would pass it")
    p.add_argument("--load-reserve", type=float, default=20.0, help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true",
                   help="3 timed batch-1 requests, a 4-token warm-up round, and a 140 s budget")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--client-plan", default=None, help=argparse.SUPPRESS)  # the load generator's process
    p.add_argument("--client-out", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.client_plan:
        plan = json.loads(Path(a.client_plan).read_text())
        Path(a.client_out).write_text(json.dumps(asyncio.run(client(plan))))
        return
    if a.quick:
        a.requests, a.warmup_tokens = min(a.requests, 3), min(a.warmup_tokens, 4)
        a.budget = 140.0 if a.budget is None else a.budget
    require_device(a.device)
    t_start = time.perf_counter()

    def left() -> float:
        return float("inf") if a.budget is None else a.budget - (time.perf_counter() - t_start)

    from llamaherd.serve.app import running_server

    cuda = a.device.startswith("cuda")
    dtype = DTYPES[a.dtype]
    info = machine()
    print_machine(info)
    t0 = time.perf_counter()
    tok = synthetic_tokenizer(preset(a.preset).vocab_size >= LLAMA3_RANKS + 256)
    tokenizer_s = time.perf_counter() - t0
    args = preset(a.preset, vocab_size=tok.n_words)
    assert tok.n_words == args.vocab_size
    compile_ours = not a.no_compile
    ours = f"llamaherd ({'compile=True' if compile_ours else 'eager'})"
    print(f"config: preset {a.preset} (dim {args.dim}, {args.n_layers} layers, {args.n_heads}/{args.n_kv_heads} "
          f"heads, vocab {args.vocab_size}: tokenizer built in {tokenizer_s:.1f}s), {a.dtype} on {a.device}; "
          f"streamed chat requests of {a.tokens} tokens (ignore_eos, greedy): {a.requests} one at a time, "
          f"{a.concurrency} at once", flush=True)
    result = {"benchmark": "gpu_serve", "machine": info, "config": vars(a), "tokenizer_build_s": tokenizer_s,
              "target_batch1_tok_per_s": TARGET_TOK_S}

    t0 = time.perf_counter()
    model = build_ours(args, seed=0, dtype=dtype, device=a.device).eval()
    wbytes = weight_bytes(model)
    result["model_build_s"] = time.perf_counter() - t0
    bw = copy_bandwidth(a.device, a.copy_gib if a.copy_gib is not None else (2.0 if cuda else 0.25))
    ceiling = bw / wbytes
    result.update(weight_bytes=wbytes, copy_bandwidth_bytes_per_s=bw, ceiling_tok_per_s=ceiling)
    print(f"weights {wbytes / 1e9:.2f} GB; copy bandwidth {bw / 1e12:.2f} TB/s -> ceiling {ceiling:.1f} tok/s",
          flush=True)

    topics = ["the sea", "a lighthouse", "prime numbers", "a bicycle", "the moon", "bread", "a library", "rain"]
    plan = {"single": {"prompts": [f"Request {i}: write a few lines about {topics[i % len(topics)]}."
                                   for i in range(a.requests)], "tokens": a.tokens},
            "concurrent": {"prompts": [f"Request {i}: write a short story about {topics[i % len(topics)]}."
                                       for i in range(a.concurrency)], "tokens": a.tokens,
                           "warmup_tokens": a.warmup_tokens}}

    with tempfile.TemporaryDirectory(prefix="gpu-serve-") as tmpdir:
        tmp = Path(tmpdir)
        # --- ours ---------------------------------------------------------------------------------------
        t0 = time.perf_counter()
        try:
            with running_server(model, tok, NAME, max_batch=a.concurrency, kv_blocks=a.kv_blocks,
                                block_size=a.block_size, compile=compile_ours) as (url, app, engine):
                build_s = time.perf_counter() - t0
                print(f"{ours}: serving after {build_s:.1f}s (engine start"
                      f"{', compilation and warm-up' if compile_ours else ''})", flush=True)
                raw = run_client({**plan, "url": url}, tmp, 1800)  # no budget: gpu_all.sh's limit stops ours
                largest_batch = max(engine.batch_sizes, default=0)
        except Exception as e:  # the JSON says what failed, then the traceback
            result["ours"] = {"name": ours, "error": f"{type(e).__name__}: {e}"}
            write_json(a.out, result)
            raise
        result["ours"] = {"name": ours, "build_s": build_s, "largest_decode_batch": largest_batch,
                          **summarize(raw, a.tokens)}
        if cuda:
            result["ours"]["max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated()
        write_json(a.out, result)  # now: a run stopped at its time limit keeps our numbers
        del app, engine

        # --- vLLM, after our server has stopped and its memory is freed -----------------------------------
        ckpt = tmp / "hf"
        if importlib.util.find_spec("vllm") is None:
            result["vllm"] = "not installed"
        elif a.no_vllm:
            result["vllm"] = "skipped (--no-vllm)"
        elif not cuda:
            result["vllm"] = f"skipped (--device {a.device})"
        elif left() < 90:  # saving the checkpoint, vLLM's start and the load would not fit
            result["vllm"] = f"skipped: {max(left(), 0):.0f} s left of the time budget (--budget {a.budget:g})"
        else:
            from llamaherd.checkpoint import save

            t0 = time.perf_counter()
            try:
                save(model, ckpt, layout="hf", tokenizer=tok)
                result["hf_checkpoint_save_s"] = time.perf_counter() - t0
                print(f"saved the weights and tokenizer in the Hugging Face layout for vLLM in "
                      f"{result['hf_checkpoint_save_s']:.1f}s", flush=True)
            except Exception as e:  # no checkpoint, no vLLM: reported, ours stands
                result["vllm"] = f"not run: saving the Hugging Face checkpoint failed: {type(e).__name__}: {e}"
        del model
        torch._dynamo.reset()
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            result["memory_allocated_before_vllm_bytes"] = torch.cuda.memory_allocated()
        if ckpt.is_dir():
            result["vllm"] = measure_vllm(ckpt, tmp, plan, a, left)
        write_json(a.out, result)

    # --- the table -------------------------------------------------------------------------------------------
    rows = []
    b1_load = f"batch 1 ({a.requests} x {a.tokens} tok)"
    many_load = f"{a.concurrency} concurrent ({a.concurrency} x {a.tokens} tok)"
    contenders = [(ours, result["ours"])]
    vllm = result["vllm"]
    if isinstance(vllm, dict) and "batch1" in vllm:
        contenders.append((f"vLLM {vllm['version']}", vllm))
    for name, r in contenders:
        b1, many = r["batch1"], r["concurrent"]
        rows.append([name, b1_load, f"{b1['tok_per_s_median']:,.1f}", _ms(b1, "ttft"), _ms(b1, "itl"),
                     _ms(b1, "tpot"), f">= {TARGET_TOK_S}", f"{b1['tok_per_s_median'] / ceiling:.0%}"])
        rows.append([name, many_load, f"{many['tok_per_s']:,.1f}", _ms(many, "ttft"), _ms(many, "itl"),
                     _ms(many, "tpot"), "", ""])
    rows.append(["ceiling: copy bandwidth / weight bytes", "batch 1", f"{ceiling:,.1f}", "", "", "", "", "100%"])
    print()
    print(fmt_table(["server", "load", "tok/s", "TTFT p50 / p99 ms", "ITL p50 / p99 ms", "TPOT p50 / p99 ms",
                     "target tok/s", "of ceiling"], rows))
    r = result["ours"]
    b1 = r["batch1"]
    print(f"{ours}: build (engine start{' + compilation' if compile_ours else ''}) {r['build_s']:.1f}s; batch 1: "
          f"{b1['tok_per_s_median']:.1f} tok/s with TTFT, {b1['decode_tok_per_s_after_first_median'] or 0:.1f} "
          f"tok/s after the first token; largest decode batch {r['largest_decode_batch']}; every request "
          f"generated all its tokens: {r['every_request_generated_all_tokens']}")
    on_target_setup = a.preset == "llama3-8b" and cuda and a.dtype == "bfloat16"
    met = r["batch1"]["tok_per_s_median"] >= TARGET_TOK_S if on_target_setup else None
    result["target_met"] = met
    print(f"target: batch-1 >= {TARGET_TOK_S} tok/s through the server (llama3-8b, bf16, one H100/H200): "
          + ({True: "met", False: "NOT met"}[met] if met is not None else "no verdict (not that setup)"))
    if isinstance(vllm, dict):
        if "batch1" in vllm:
            print(f"vLLM {vllm['version']}: serving after {vllm['start_s']:.1f}s; {a.concurrency} concurrent: ours / "
                  f"vLLM = {r['concurrent']['tok_per_s'] / vllm['concurrent']['tok_per_s']:.2f}x; batch 1: "
                  f"{r['batch1']['tok_per_s_median'] / vllm['batch1']['tok_per_s_median']:.2f}x")
        else:
            print(f"vLLM {vllm['version']}: {vllm.get('error')}")
    else:
        print(f"vLLM: {vllm}")
    result["total_wall_s"] = time.perf_counter() - t_start
    print(f"total wall time {result['total_wall_s']:.0f}s")
    write_json(a.out, result)


if __name__ == "__main__":
    main()
