"""The cost of moderation: `herd serve` with and without a guard, 16 concurrent clients, in one run.

The served model and the guard are the same small shape (a byte-level vocabulary, seeded random weights,
float32), as Llama Guard 2 8B guards an 8B model. The guard checks every request and every response
(``--guard-on input,output``) with its threshold at 1, so that it flags nothing and every request generates
all its tokens: what is measured is the work of the checks (one guard forward a batch of waiting checks,
a streamed response checked every 200 characters and at its end), not fewer tokens.

  unguarded              herd serve, 16 concurrent chat requests (whole answers), then streamed
  guarded                the same with --guard (input and output)
  guarded + Code Shield  the same with --code-shield warn as well (every response scanned)

    python benchmarks/cpu_serve_guard.py                  # dim 128, 4 layers, 16 clients x 64 tokens
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

import torch
from common import build_ours, fmt_table, machine, print_machine, write_json
from cpu_serve import load, serving

from llamaherd.model.args import preset
from llamaherd.tokenizer import Tokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    print_machine(machine())
    tok = Tokenizer.from_ranks({bytes([i]): i for i in range(256)})
    args = preset("tiny", dim=a.dim, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=tok.n_words, multiple_of=32,
                  max_seq_len=2048)  # the guard reads its prompt of about 800 bytes with each conversation
    model = build_ours(args).eval()
    torch.manual_seed(1)
    guard = build_ours(args).eval()
    prompts = [f"request {i}: def f{i}(x):" for i in range(a.clients)]
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        from llamaherd.checkpoint import save

        save(guard, Path(tmp) / "guard", layout="herd", tokenizer=tok)
        guarded = ("--guard", str(Path(tmp) / "guard"), "--guard-threshold", "1.0")
        try:
            import llamaherd.safety.codeshield  # noqa: F401

            shielded = (*guarded, "--code-shield", "warn")
        except ImportError:
            shielded = None
        for name, extra in (("unguarded", ()), ("guarded", guarded), ("guarded + Code Shield", shielded)):
            if extra is None:
                continue
            with serving(model, tok, Path(tmp), a.clients, 1, False, extra) as url:
                got, _ = asyncio.run(load(url, prompts, a.tokens))
            results[f"{name}, {a.clients} concurrent"] = got[f"served, {a.clients} concurrent"]
            results[f"{name}, {a.clients} concurrent, streamed"] = got[f"served, {a.clients} concurrent, streamed"]
            results[f"{name}, one at a time"] = got["served, one at a time"]
    rows = []
    for name, v in results.items():
        base = results["unguarded" + name[name.index(","):]]
        rows.append([name, f"{v:,.0f}", f"{v / base:.2f}x"])
    print(fmt_table(["server", "tokens/s", "vs unguarded"], rows))
    write_json(a.out, {"machine": machine(), "results": results})


if __name__ == "__main__":
    main()
