"""Serving throughput on this CPU: 16 concurrent clients against the same requests one at a time, against HF
`generate` on the same batch, and against the model-only ceiling.

A small model (``--dim``, a byte-level vocabulary) with seeded random weights, float32. Each request is a
short prompt and ``--tokens`` greedy tokens (stop tokens ignored, so every request generates them all).

  served, 16 concurrent     `herd serve` on loopback, 16 client threads at once (then again, streamed)
  served, one at a time     the same server, the same requests in turn
  HF generate, batch 16     LlamaForCausalLM.generate on the 16 prompts (left-padded), same weights
  ceiling                   the model alone: a batched decode step of 16 rows against 16 one-row steps, over
                            the paged cache at the requests' mean length (what batching can give at most),
                            with the engine's thread count (--engine-threads) and with --threads

The server is `herd serve` in a process of its own; the clients are one asyncio loop of httpx requests (a
light load generator, as vLLM's serving benchmark uses: 16 client threads of the openai client took a
good part of this 2-core machine themselves), and the streamed ones time their first token and the gaps
between tokens: p50 / p99 under the concurrent load.

    python benchmarks/cpu_serve.py                      # dim 128, 4 layers, 16 clients x 64 tokens
    python benchmarks/cpu_serve.py --preset tiny        # the tiny preset (dim 256)
    python benchmarks/cpu_serve.py --compile            # herd serve --compile, against a compiled ceiling
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch
from common import build_hf, build_ours, fmt_table, machine, print_machine, write_json

from llamaherd.model.args import preset
from llamaherd.tokenizer import Tokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None, help="a model preset (default: dim --dim, 4 layers)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="torch threads of this process (HF, a ceiling)")
    p.add_argument("--engine-threads", type=int, default=1, help="herd serve --threads (default 1, its default)")
    p.add_argument("--compile", action="store_true", help="herd serve --compile; the ceiling compiled too")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    print_machine(machine())
    from llamaherd.serve.paged import BlockPool

    tok = Tokenizer.from_ranks({bytes([i]): i for i in range(256)})
    if a.preset:
        args = preset(a.preset, vocab_size=tok.n_words)
    else:
        args = preset("tiny", dim=a.dim, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=tok.n_words, multiple_of=32)
    model = build_ours(args).eval()
    prompts = [f"request {i}: def f{i}(x):" for i in range(a.clients)]
    with tempfile.TemporaryDirectory() as tmp, serving(model, tok, Path(tmp), a.clients, a.engine_threads,
                                                       a.compile) as url:
        results, latency = asyncio.run(load(url, prompts, a.tokens))
    # the engine alone, in this process (no HTTP): the same requests at once, tokens as the server makes them
    from llamaherd.serve.engine import Engine, SamplingParams
    from llamaherd.tokenizer.chat import ChatFormat

    chat = ChatFormat(tok)
    chat_ids = [chat.encode_dialog_prompt([{"role": "user", "content": pr}]) for pr in prompts]
    engine = Engine(model, tok, max_batch=a.clients, kv_blocks=4096, threads=a.engine_threads,
                    compile=a.compile).start()
    for _ in range(2):  # the first: a warm-up
        t0 = time.perf_counter()
        requests = [engine.submit(x, SamplingParams(max_tokens=a.tokens, temperature=0, stop_tokens=False))
                    for x in chat_ids]
        for r in requests:
            r.done.wait()
        results[f"engine alone (no HTTP), {a.clients} at once"] = (sum(len(r.output) for r in requests)
                                                                   / (time.perf_counter() - t0))
    engine.stop()
    # HF generate on the same batch
    try:
        hf = build_hf(model).eval()
        ids = [tok.encode(pr, bos=True) for pr in prompts]
        width = max(map(len, ids))
        batch = torch.tensor([[0] * (width - len(x)) + x for x in ids])
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
        with torch.no_grad():
            hf.generate(batch[:1], attention_mask=mask[:1], max_new_tokens=4, do_sample=False)
            t0 = time.perf_counter()
            out = hf.generate(batch, attention_mask=mask, max_new_tokens=a.tokens, min_new_tokens=a.tokens,
                              do_sample=False, pad_token_id=0)
            results[f"HF generate, batch {a.clients}"] = (out.shape[1] - width) * a.clients / (time.perf_counter() - t0)
    except Exception as e:  # transformers missing or incompatible: the rest still stands
        print(f"HF generate skipped: {e}")
    # the model-only ceiling: one batched decode step vs one-row steps over the paged cache, at the requests'
    # mean length (prompt + half the generated tokens)
    length = round(statistics.mean(map(len, chat_ids)) + a.tokens / 2)
    pool = BlockPool(args, 4096, 16)
    tables = [pool.allocate(length + 1) for _ in range(a.clients)]
    tokens = torch.zeros(a.clients, 1, dtype=torch.long)
    positions = torch.full((a.clients, 1), length)

    forward = torch.compile(model.forward, dynamic=True) if a.compile else model

    def batched():
        forward(tokens, positions, cache=pool.view(tables, [length + 1] * a.clients, positions))

    def singles():
        for b in range(a.clients):
            forward(tokens[b:b + 1], positions[b:b + 1], cache=pool.view([tables[b]], [length + 1], positions[b:b + 1]))

    for threads in dict.fromkeys((a.engine_threads, a.threads)):
        torch.set_num_threads(threads)
        with torch.no_grad():
            for fn in (batched, singles):
                fn()
            tb = statistics.median([_timed(batched) for _ in range(30)])
            ts = statistics.median([_timed(singles) for _ in range(5)])
        results[f"ceiling: batched step, {threads} thread(s)"] = a.clients / tb
        results[f"ceiling: {a.clients} one-row steps, {threads} thread(s)"] = a.clients / ts
    torch.set_num_threads(a.threads)
    seq = results["served, one at a time"]
    rows = [[name, f"{v:,.0f}", f"{v / seq:.2f}x"] for name, v in results.items()]
    print(fmt_table(["contender", "tokens/s", "vs one at a time"], rows))
    conc = results[f"served, {a.clients} concurrent"]
    for threads in dict.fromkeys((a.engine_threads, a.threads)):
        step = results[f"ceiling: batched step, {threads} thread(s)"]
        one = results[f"ceiling: {a.clients} one-row steps, {threads} thread(s)"]
        print(f"{threads} thread(s): model-only ceiling {step / one:.2f}x; served concurrent reaches "
              f"{conc / step:.0%} of the batched step's tokens/s (streamed "
              f"{results[f'served, {a.clients} concurrent, streamed'] / step:.0%}; the engine alone "
              f"{results[f'engine alone (no HTTP), {a.clients} at once'] / step:.0%})")
    print(f"served concurrent / one at a time: {conc / seq:.2f}x (length of the ceiling's rows: {length})")
    for name, (p50, p99) in latency.items():
        print(f"{name}: p50 {p50 * 1e3:.1f} ms, p99 {p99 * 1e3:.1f} ms")
    write_json(a.out, {"machine": machine(), "results": results,
                       "latency_ms": {k: [v[0] * 1e3, v[1] * 1e3] for k, v in latency.items()}})


async def load(url: str, prompts: list[str], tokens: int) -> tuple[dict, dict]:
    """The load: the requests one at a time, then all at once (whole answers, then streamed); tokens/s of each,
    and time to first token and between tokens (p50, p99) of the streamed ones."""
    import httpx

    latency: dict[str, list[float]] = {"ttft": [], "itl": []}
    results = {}
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=None)) as http:
        async def one(prompt, stream=False):
            """A chat request of exactly ``tokens`` tokens; streamed: its first-token and between-token
            latencies are kept. Its generated tokens (the usage the server reports)."""
            body = {"model": "bench", "messages": [{"role": "user", "content": prompt}], "max_tokens": tokens,
                    "temperature": 0, "ignore_eos": True}
            if not stream:
                r = await http.post("/v1/chat/completions", json=body)
                return r.json()["usage"]["completion_tokens"]
            body |= {"stream": True, "stream_options": {"include_usage": True}}
            t0, stamps, usage = time.perf_counter(), [], 0
            async with http.stream("POST", "/v1/chat/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        usage = chunk["usage"]["completion_tokens"]
                    elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                        stamps.append(time.perf_counter())
            latency["ttft"].append(stamps[0] - t0)
            latency["itl"].extend(b - a for a, b in zip(stamps, stamps[1:]))
            return usage

        await one(prompts[0])  # warm-up
        t0 = time.perf_counter()
        n = 0
        for prompt in prompts:
            n += await one(prompt)
        results["served, one at a time"] = n / (time.perf_counter() - t0)
        for stream, name in ((False, f"served, {len(prompts)} concurrent"),
                             (True, f"served, {len(prompts)} concurrent, streamed")):
            t0 = time.perf_counter()
            counts = await asyncio.gather(*(one(prompt, stream) for prompt in prompts))
            results[name] = sum(counts) / (time.perf_counter() - t0)
    return results, {name: (statistics.quantiles(xs, n=100)[49], statistics.quantiles(xs, n=100)[98])
                     for name, xs in latency.items() if len(xs) > 2}


@contextlib.contextmanager
def serving(model, tok, tmp: Path, batch: int, threads: int, compile: bool, extra: tuple[str, ...] = ()):
    """`herd serve` on ``model`` (saved to ``tmp``) as a process of its own, on a free loopback port, with
    ``extra`` options."""
    from llamaherd.checkpoint import save
    from llamaherd.serve.app import free_port

    if not (tmp / "ckpt").exists():
        save(model, tmp / "ckpt", layout="herd", tokenizer=tok)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "llamaherd", "serve", str(tmp / "ckpt"), "--port", str(port),
                             "--name", "bench", "--max-batch", str(batch), "--kv-blocks", "4096",
                             "--threads", str(threads)] + ["--compile"] * compile + list(extra),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(6000):
            try:
                if urllib.request.urlopen(url + "/health").status == 200:
                    break
            except OSError:
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
