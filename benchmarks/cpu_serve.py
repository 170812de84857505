"""Serving throughput on this CPU: 16 concurrent clients against the same requests one at a time, against HF
`generate` on the same batch, and against the model-only ceiling.

A small model (``--dim``, a byte-level vocabulary) with seeded random weights, float32. Each request is a
short prompt and ``--tokens`` greedy tokens (stop tokens ignored, so every request generates them all).

  served, 16 concurrent     `herd serve` on loopback, 16 client threads at once (then again, streamed)
  served, one at a time     the same server, the same requests in turn
  HF generate, batch 16     LlamaForCausalLM.generate on the 16 prompts (left-padded), same weights
  ceiling                   the model alone: a batched decode step of 16 rows against 16 one-row steps, over
                            the paged cache (what batching can give at most)

The server is `herd serve` in a process of its own; the clients stream chat completions (official openai
client, one thread each) and time their first token and the gaps between tokens: p50 / p99 under the
concurrent load.

    python benchmarks/cpu_serve.py                      # dim 128, 4 layers, 16 clients x 64 tokens
    python benchmarks/cpu_serve.py --preset tiny        # the tiny preset (dim 256)
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import tempfile
import threading
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
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    print_machine(machine())
    from openai import OpenAI

    from llamaherd.serve.paged import BlockPool

    tok = Tokenizer.from_ranks({bytes([i]): i for i in range(256)})
    if a.preset:
        args = preset(a.preset, vocab_size=tok.n_words)
    else:
        args = preset("tiny", dim=a.dim, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=tok.n_words, multiple_of=32)
    model = build_ours(args).eval()
    prompts = [f"request {i}: def f{i}(x):" for i in range(a.clients)]
    results = {}
    latency: dict[str, list[float]] = {"ttft": [], "itl": []}
    with tempfile.TemporaryDirectory() as tmp, serving(model, tok, Path(tmp), a.clients) as url:
        client = OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)

        def one(prompt, record=False):
            """A chat request of exactly --tokens tokens (streamed when ``record``: its first-token and
            between-token latencies are kept); its generated tokens."""
            if not record:
                r = client.chat.completions.create(model="bench", messages=[{"role": "user", "content": prompt}],
                                                   max_tokens=a.tokens, temperature=0, extra_body={"ignore_eos": True})
                return r.usage.completion_tokens
            t0 = time.perf_counter()
            stamps, usage = [], None
            for chunk in client.chat.completions.create(
                    model="bench", messages=[{"role": "user", "content": prompt}], max_tokens=a.tokens,
                    temperature=0, stream=True, stream_options={"include_usage": True},
                    extra_body={"ignore_eos": True}):
                if chunk.usage is not None:
                    usage = chunk.usage.completion_tokens
                elif chunk.choices and chunk.choices[0].delta.content:
                    stamps.append(time.perf_counter())
            if record and stamps:
                latency["ttft"].append(stamps[0] - t0)
                latency["itl"].extend(b - a for a, b in zip(stamps, stamps[1:]))
            return usage

        one(prompts[0])  # warm-up
        t0 = time.perf_counter()
        seq_tokens = sum(one(pr) for pr in prompts)
        results["served, one at a time"] = seq_tokens / (time.perf_counter() - t0)
        for record, name in ((False, f"served, {a.clients} concurrent"),
                             (True, f"served, {a.clients} concurrent, streamed")):
            counts = [0] * a.clients

            def worker(i, record=record, counts=counts):
                counts[i] = one(prompts[i], record=record)

            threads = [threading.Thread(target=worker, args=(i,)) for i in range(a.clients)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            results[name] = sum(counts) / (time.perf_counter() - t0)
        latency = {name: (statistics.quantiles(xs, n=100)[49], statistics.quantiles(xs, n=100)[98])
                   for name, xs in latency.items() if len(xs) > 2}
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
    # the model-only ceiling: one batched decode step vs one-row steps over the paged cache
    pool = BlockPool(args, 4096, 16)
    length = 32
    tables = [pool.allocate(length + 1) for _ in range(a.clients)]
    tokens = torch.zeros(a.clients, 1, dtype=torch.long)
    positions = torch.full((a.clients, 1), length)
    with torch.no_grad():
        def batched():
            model(tokens, positions, cache=pool.view(tables, [length + 1] * a.clients))

        def singles():
            for b in range(a.clients):
                model(tokens[b:b + 1], positions[b:b + 1], cache=pool.view([tables[b]], [length + 1]))

        for fn in (batched, singles):
            fn()
        tb = statistics.median([_timed(batched) for _ in range(20)])
        ts = statistics.median([_timed(singles) for _ in range(5)])
    results["ceiling: batched step"] = a.clients / tb
    results["ceiling: 16 one-row steps"] = a.clients / ts
    seq = results["served, one at a time"]
    rows = [[name, f"{v:,.0f}", f"{v / seq:.2f}x"] for name, v in results.items()]
    print(fmt_table(["contender", "tokens/s", "vs one at a time"], rows))
    conc = results[f"served, {a.clients} concurrent"]
    print(f"served concurrent / one at a time: {conc / seq:.2f}x; model-only ceiling {ts / tb:.2f}x; "
          f"served reaches {conc / results['ceiling: batched step']:.0%} of the batched step's tokens/s")
    for name, (p50, p99) in latency.items():
        print(f"{name}: p50 {p50 * 1e3:.1f} ms, p99 {p99 * 1e3:.1f} ms")
    write_json(a.out, {"machine": machine(), "results": results,
                       "latency_ms": {k: [v[0] * 1e3, v[1] * 1e3] for k, v in latency.items()}})


@contextlib.contextmanager
def serving(model, tok, tmp: Path, batch: int):
    """`herd serve` on ``model`` (saved to ``tmp``) as a process of its own, on a free loopback port."""
    from llamaherd.checkpoint import save
    from llamaherd.serve.app import free_port

    save(model, tmp / "ckpt", layout="herd", tokenizer=tok)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "llamaherd", "serve", str(tmp / "ckpt"), "--port", str(port),
                             "--name", "bench", "--max-batch", str(batch), "--kv-blocks", "4096"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
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
