"""Serving throughput on this CPU: 16 concurrent clients against the same requests one at a time, against HF
`generate` on the same batch, and against the model-only ceiling.

A small model (``--dim``, a byte-level vocabulary) with seeded random weights, float32. Each request is a
short prompt and ``--tokens`` greedy tokens (stop tokens ignored, so every request generates them all).

  served, 16 concurrent     a real server on loopback, 16 client threads (official openai client)
  served, one at a time     the same server, the same requests in turn
  HF generate, batch 16     LlamaForCausalLM.generate on the 16 prompts (left-padded), same weights
  ceiling                   the model alone: a batched decode step of 16 rows against 16 one-row steps, over
                            the paged cache (what batching can give at most)

Also time to first token and inter-token latency p50 / p99 under the concurrent load (from the server's
own histograms' raw observations).

    python benchmarks/cpu_serve.py                      # dim 128, 4 layers, 16 clients x 64 tokens
    python benchmarks/cpu_serve.py --preset tiny        # the tiny preset (dim 256)
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

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

    from llamaherd.serve.app import running_server
    from llamaherd.serve.paged import BlockPool

    tok = Tokenizer.from_ranks({bytes([i]): i for i in range(256)})
    if a.preset:
        args = preset(a.preset, vocab_size=tok.n_words)
    else:
        args = preset("tiny", dim=a.dim, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=tok.n_words, multiple_of=32)
    model = build_ours(args).eval()
    prompts = [f"request {i}: def f{i}(x):" for i in range(a.clients)]
    body = dict(max_tokens=a.tokens, temperature=0)
    results = {}
    observed: dict[str, list[float]] = {"ttft": [], "itl": []}
    with running_server(model, tok, "bench", max_batch=a.clients, kv_blocks=4096, block_size=16) as (url, _, engine):
        engine.observers.append(lambda name, s: observed[name].append(s))
        client = OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)

        def one(prompt):
            # the model's stop tokens are ignored by asking for them as ordinary tokens: a random model
            # stops early otherwise; the same for every contender
            r = client.completions.create(model="bench", prompt=prompt, **body, extra_body={"ignore_eos": True})
            return r.usage.completion_tokens

        one(prompts[0])  # warm-up
        t0 = time.perf_counter()
        seq_tokens = sum(one(pr) for pr in prompts)
        results["served, one at a time"] = seq_tokens / (time.perf_counter() - t0)
        observed = {"ttft": [], "itl": []}
        counts = [0] * a.clients

        def worker(i):
            counts[i] = one(prompts[i])

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(a.clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        results[f"served, {a.clients} concurrent"] = sum(counts) / (time.perf_counter() - t0)
        latency = {name: (statistics.quantiles(xs, n=100)[49], statistics.quantiles(xs, n=100)[98])
                   for name, xs in observed.items() if len(xs) > 2}
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


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
