"""Speculative decoding against plain greedy decoding of the same target, side by side in one run.

Seeded random weights agree with nothing, so two drafts bound what a trained pair does:

  self draft      the target proposes its own tokens: every one is accepted (acceptance 1.0), the best case;
                  with a draft as costly as the target it shows the verify path's overhead, not a speed-up
  random draft    a small unrelated model: almost every token refused (acceptance near 0), the worst case:
                  the price of drafting when the draft is always wrong

A trained draft of the target's family (Llama 3.2 1B for Llama 3.1 8B) sits in between; its speed-up is about
(tokens a round) x (target step time) / (k draft steps + one target forward over k + 1 tokens). Every contender
must produce the plain greedy tokens (checked before timing). Tokens/s = new tokens / wall time of the call.

    python benchmarks/cpu_speculative.py                     # CPU: target dim 512 x 8 layers, ~1 minute
    python benchmarks/cpu_speculative.py --device cuda --quick   # llama3-8b target, llama3.2-1b draft, bf16
"""

from __future__ import annotations

import argparse

import torch
from common import (
    add_threads_argument,
    build_ours,
    fmt_table,
    interleaved,
    machine,
    paired_ratio,
    print_machine,
    require_device,
    set_threads,
    stats,
    write_json,
)

from llamaherd.generation import generate, prepare_for_decoding
from llamaherd.model import ModelArgs, preset


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--draft-tokens", type=int, default=4)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="32 new tokens, 2 rounds")
    p.add_argument("--out", default=None)
    add_threads_argument(p)
    a = p.parse_args()
    require_device(a.device)
    set_threads(a.threads)
    if a.quick:
        a.new_tokens, a.reps = 32, 2
    print_machine(machine())
    cuda = a.device.startswith("cuda")
    if cuda:
        dtype = torch.bfloat16
        t_args = preset("llama3-8b", max_seq_len=512)
        d_args = preset("llama3.2-1b", max_seq_len=512)
    else:
        dtype = torch.float32
        t_args = ModelArgs(dim=512, n_layers=8, n_heads=8, n_kv_heads=4, vocab_size=8192, max_seq_len=512)
        d_args = ModelArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=8192, max_seq_len=512)
    target = prepare_for_decoding(build_ours(t_args, seed=0, std=0.2, dtype=dtype, device=a.device))
    draft = prepare_for_decoding(build_ours(d_args, seed=1, std=0.2, dtype=dtype, device=a.device))
    prompt = torch.randint(0, t_args.vocab_size, (16,), generator=torch.Generator().manual_seed(0)).tolist()
    want = generate(target, [prompt], max_new_tokens=a.new_tokens)
    runs = {"plain greedy": {}, "self draft": {"draft_model": target}, "random draft": {"draft_model": draft}}
    acceptance = {}
    for name, kw in runs.items():
        st = {}
        got = generate(target, [prompt], max_new_tokens=a.new_tokens, draft_tokens=a.draft_tokens, stats=st, **kw)
        if got != want:
            raise SystemExit(f"error: {name} decoded other tokens than plain greedy decoding")
        acceptance[name] = st.get("acceptance")
    times = interleaved({name: (lambda kw=kw: generate(target, [prompt], max_new_tokens=a.new_tokens,
                                                        draft_tokens=a.draft_tokens, **kw))
                         for name, kw in runs.items()}, a.reps)
    rows, results = [], []
    for name in runs:
        tps = a.new_tokens / stats(times[name])["median"]
        ratio = paired_ratio(times["plain greedy"], times[name])
        results.append({"contender": name, "tokens_per_s": tps, "vs_plain": ratio, "acceptance": acceptance[name]})
        rows.append([name, f"{tps:,.1f}", f"{ratio['median']:.2f}x ({ratio['min']:.2f}-{ratio['max']:.2f})",
                     "-" if acceptance[name] is None else f"{acceptance[name]:.2f}"])
    print(fmt_table(["decoding", "tokens/s", "vs plain greedy", "acceptance"], rows))
    write_json(a.out, {"machine": machine(), "settings": vars(a), "results": results})


if __name__ == "__main__":
    main()
