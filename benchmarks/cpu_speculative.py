"""Speculative decoding against plain greedy decoding of the same target, side by side in one run.

Seeded random weights agree with nothing, so two drafts bound what a trained pair does:

  self draft      the target proposes its own tokens: every one is accepted (acceptance 1.0), the best case;
                  with a draft as costly as the target it shows the verify path's overhead, not a speed-up
  random draft    a small unrelated model: almost every token refused (acceptance near 0), the worst case:
                  the price of drafting when the draft is always wrong

Then a real pair, unless --train-steps 0 (or --quick): a target (dim 128 x 4 layers) and a 1-layer draft
(dim 64), both trained from scratch for --train-steps AdamW steps on the same bytes (the Python standard
library's source, vocab 256; ~1.5 minutes on 2 CPU cores), decoding a prompt from modules neither saw, greedy
and sampled (T = 1, against plain sampling; sampled output keeps the target's distribution, which
tests/test_speculative.py checks, but not its tokens). Trained this briefly both models are weak (held-out
losses are printed) and their greedy text loops, so its acceptance says little about a real pair such as
Llama 3.2 1B drafting for Llama 3.1 8B; it is measured, not assumed. Models this small are bound by Python's
per-call overhead, not by arithmetic: the speed-up is about (tokens a round) x (target step time) / (k draft
steps + one target forward over k + 1 tokens), with each step's cost set by its layer count.

Every contender must produce the plain greedy tokens, checked before timing on a CPU. On CUDA (bfloat16 for
the random-weight pair) the verify forward over k + 1 tokens runs other kernels than a one-token step, which
round differently, and a near tie may go the other way, so there the column "same tokens" reports how many
tokens agree before the first difference rather than stopping the run. Tokens/s = new tokens / wall time of the call.

    python benchmarks/cpu_speculative.py                     # CPU: ~3.5 minutes on 2 cores
    python benchmarks/cpu_speculative.py --device cuda --quick   # llama3-8b target, llama3.2-1b draft, bf16
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
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

from llamaherd.data.stdlib_corpus import stdlib_documents
from llamaherd.generation import generate, prepare_for_decoding
from llamaherd.model import ModelArgs, Transformer, preset


def stdlib_bytes(split: str, max_bytes: int) -> torch.Tensor:
    """The stdlib corpus's code as one tensor of byte values (the token ids of a 256-token vocabulary)."""
    text = "\n".join(d.text for d in stdlib_documents(split, kinds=("code",), max_bytes=max_bytes))
    return torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8).long()


def windows(data: torch.Tensor, n: int, seq: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` random windows of ``seq`` + 1 tokens of ``data``: [n, seq + 1]."""
    starts = torch.randint(0, len(data) - seq - 1, (n,), generator=gen)
    return torch.stack([data[s : s + seq + 1] for s in starts.tolist()])


def next_token_loss(model, x: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())


def train(args: ModelArgs, data: torch.Tensor, held_out: torch.Tensor, steps: int, seed: int, device: str,
          batch: int = 16, seq: int = 128, lr: float = 3e-3) -> Transformer:
    """``steps`` AdamW steps of next-byte prediction on random windows of ``data``: warm-up, then linear decay;
    prints the loss on 32 windows of ``held_out``."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = Transformer(args)
    model.init_weights(seed=seed)
    model.init_rope(device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for step in range(steps):
        loss = next_token_loss(model, windows(data, batch, seq, gen).to(device))
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 20) * (1 - 0.9 * step / steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        val = next_token_loss(model, windows(held_out, 32, seq, torch.Generator().manual_seed(0)).to(device))
    print(f"  trained {args.n_layers} layers x dim {args.dim}: {steps} steps in {time.perf_counter() - t0:.0f} s, "
          f"held-out loss {val.item():.3f} nats a byte", flush=True)
    return model


def same_prefix(got: list[int], want: list[int]) -> int:
    """How many tokens agree before the first difference."""
    return next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))


def measure(group: str, target, drafts: dict, prompt: list[int], a, exact: bool, temperature: float = 0.0,
            reps: int | None = None) -> tuple[list, list]:
    """Table rows and JSON results of plain decoding and of each draft, timed in interleaved rounds. Greedy
    output is checked against plain greedy decoding; sampled output (seeded) is not comparable token by token."""
    plain = "plain greedy" if temperature == 0 else f"plain, T={temperature:g}"
    runs = {plain: {}, **{name: {"draft_model": d} for name, d in drafts.items()}}

    def run(kw, st=None):
        return generate(target, [prompt], max_new_tokens=a.new_tokens, temperature=temperature, seed=0,
                        draft_tokens=a.draft_tokens, stats=st, **kw)[0]

    want = run({})
    acceptance, same = {}, {}
    for name, kw in runs.items():
        st = {}
        got = run(kw, st)
        same[name] = same_prefix(got, want) if temperature == 0 else None
        if temperature == 0 and exact and got != want:
            raise SystemExit(f"error: {group} {name} decoded other tokens than plain greedy decoding "
                             f"(the same {same[name]} of {len(want)})")
        acceptance[name] = st.get("acceptance")
    times = interleaved({name: (lambda kw=kw: run(kw)) for name, kw in runs.items()}, reps or a.reps)
    rows, results = [], []
    for name in runs:
        tps = a.new_tokens / stats(times[name])["median"]
        ratio = paired_ratio(times[plain], times[name])
        results.append({"pair": group, "contender": name, "temperature": temperature, "tokens_per_s": tps,
                        "vs_plain": ratio, "acceptance": acceptance[name], "same_tokens": same[name],
                        "new_tokens": len(want)})
        rows.append([group, name, f"{tps:,.1f}", f"{ratio['median']:.2f}x ({ratio['min']:.2f}-{ratio['max']:.2f})",
                     "-" if acceptance[name] is None else f"{acceptance[name]:.2f}",
                     "-" if same[name] is None else f"{same[name]}/{len(want)}"])
    return rows, results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--draft-tokens", type=int, default=4)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--train-steps", type=int, default=400,
                   help="AdamW steps for each model of the trained pair (0: no trained pair)")
    p.add_argument("--quick", action="store_true", help="32 new tokens, 2 rounds, no trained pair")
    p.add_argument("--out", default=None)
    add_threads_argument(p)
    a = p.parse_args()
    require_device(a.device)
    set_threads(a.threads)
    if a.quick:
        a.new_tokens, a.reps, a.train_steps = 32, 2, 0
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
    rows, results = measure("random weights", target, {"self draft": target, "random draft": draft}, prompt, a,
                            exact=not cuda)
    del target, draft
    if a.train_steps > 0:
        data, held_out = stdlib_bytes("train", 4_000_000), stdlib_bytes("val", 200_000)  # val: modules neither saw
        big = ModelArgs(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=64, max_seq_len=512)
        small = ModelArgs(dim=64, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=256, multiple_of=64, max_seq_len=512)
        target = prepare_for_decoding(train(big, data, held_out, a.train_steps, 0, a.device))
        draft = prepare_for_decoding(train(small, data, held_out, a.train_steps, 1, a.device))
        prompt = held_out[1000:1064].tolist()
        text = bytes(generate(target, [prompt], max_new_tokens=a.new_tokens)[0]).decode(errors="replace")
        print(f"  prompt {bytes(prompt).decode(errors='replace')!r}\n  the trained target's greedy text {text!r}")
        group = f"trained {a.train_steps} steps"
        for temperature in (0.0, 1.0):  # greedy text of weak models loops, which both learn: sampling shows more
            more_rows, more = measure(group, target, {"1-layer draft": draft}, prompt, a, not cuda, temperature,
                                      reps=3 * a.reps)  # calls of ~0.1 s: more rounds for a steadier median
            rows, results = rows + more_rows, results + more
    print(fmt_table(["pair", "decoding", "tokens/s", "vs plain", "acceptance", "same tokens"], rows))
    write_json(a.out, {"machine": machine(), "settings": vars(a), "results": results})


if __name__ == "__main__":
    main()
