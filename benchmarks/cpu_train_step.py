"""One training step on CPU: llamaherd's Transformer against Hugging Face's LlamaForCausalLM, same weights.

The `tiny` preset (vocab 8448), float32, batch 8 x 256 tokens; a step is forward, cross-entropy,
backward and an AdamW step, for both models written the same way (the loss is computed outside
the model with the same F.cross_entropy). Before timing, both models must give the same logits,
the same loss and the same gradients.

Contenders: each model eager, and each with ``torch.compile`` of its forward + loss (inductor's
C++ backend; Hugging Face's compiled run with --hf-compile). Compile warm-up (the first two steps)
is timed separately and not counted. A last row, "GEMMs only", runs nothing but the matrix
products of one step (for every Linear weight: the forward product and the two backward ones):
HF's time over it is the best ratio any implementation could reach here with the same kernels.

    python benchmarks/cpu_train_step.py                 # about 2-3 minutes on 2 cores (cold compile cache)
    python benchmarks/cpu_train_step.py --hf-compile    # + HF compiled, about 1 more minute
    python benchmarks/cpu_train_step.py --no-compile    # eager only, about 1 minute
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from common import (
    add_threads_argument,
    assert_same_logits,
    build_hf,
    build_ours,
    fmt_table,
    interleaved,
    machine,
    paired_ratio,
    print_machine,
    set_threads,
    stats,
    write_json,
)
from torch import nn

from llamaherd.model import flops_per_token, preset


def optimizer_and_loss(forward, params, lr: float, fused: bool):
    """An AdamW optimizer over ``params`` and ``loss_of(x, y)``: cross-entropy of ``forward(x) -> logits``."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.1, fused=fused or None)

    def loss_of(x, y):
        logits = forward(x)
        return F.cross_entropy(logits.flatten(0, 1), y.flatten())

    return opt, loss_of


def gemm_floor(model: nn.Module, tokens: int):
    """The matrix products of one training step and nothing else: for every Linear weight W [out, in],
    forward X @ W^T, backward dX = G @ W and dW = G^T @ X, with X [tokens, in] and G [tokens, out]."""
    weights = [m.weight.detach() for m in model.modules() if isinstance(m, nn.Linear)]
    xs = {w.shape[1]: torch.randn(tokens, w.shape[1]) for w in weights}
    gs = {w.shape[0]: torch.randn(tokens, w.shape[0]) for w in weights}

    def run():
        for w in weights:
            x, g = xs[w.shape[1]], gs[w.shape[0]]
            torch.mm(x, w.t()), torch.mm(g, w), torch.mm(g.t(), x)
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--vocab-size", type=int, default=8448)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--reps", type=int, default=6, help="timed rounds (each runs one step of every contender)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per contender after compile warm-up")
    add_threads_argument(p)
    p.add_argument("--fused-adamw", action="store_true", help="AdamW(fused=True) instead of the foreach default")
    p.add_argument("--no-compile", action="store_true", help="eager contenders only")
    p.add_argument("--hf-compile", action="store_true", help="add the compiled Hugging Face contender")
    p.add_argument("--no-floor", action="store_true", help="skip the GEMMs-only floor")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    a = p.parse_args()
    set_threads(a.threads)

    info = machine()
    print_machine(info)
    args = preset(a.preset, vocab_size=a.vocab_size, max_seq_len=max(a.seq_len, 512))
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, args.vocab_size, (a.batch, a.seq_len), generator=g)
    y = torch.randint(0, args.vocab_size, (a.batch, a.seq_len), generator=g)
    tokens = a.batch * a.seq_len
    print(f"config: preset {a.preset} (dim {args.dim}, {args.n_layers} layers, {args.n_heads}/{args.n_kv_heads} heads, "
          f"vocab {args.vocab_size}), float32, batch {a.batch} x {a.seq_len}, AdamW "
          f"({'fused' if a.fused_adamw else 'foreach'}), forward + cross-entropy + backward + step")

    # every contender gets its own copy of the same initial weights and its own optimizer
    def ours_model():
        return build_ours(args, seed=0).train()

    def hf_model():
        return build_hf(build_ours(args, seed=0)).train()

    def hf_forward(model):
        return lambda t: model(input_ids=t, use_cache=False).logits

    specs = [("llamaherd eager", ours_model, lambda m: m, False),
             ("HF eager", hf_model, hf_forward, False)]
    if not a.no_compile:
        specs.insert(1, ("llamaherd compiled", ours_model, lambda m: m, True))
        if a.hf_compile:
            specs.append(("HF compiled", hf_model, hf_forward, True))

    # honesty check: same logits, loss and gradients before any timing
    ours, hf = ours_model(), hf_model()
    max_diff = assert_same_logits(ours.eval(), hf.eval(), x[:2])
    ours.train(), hf.train()
    l1 = F.cross_entropy(ours(x).flatten(0, 1), y.flatten())
    l2 = F.cross_entropy(hf(input_ids=x, use_cache=False).logits.flatten(0, 1), y.flatten())
    l1.backward(), l2.backward()
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-6)
    g1, g2 = ours.layers[0].feed_forward.w2.weight.grad, hf.model.layers[0].mlp.down_proj.weight.grad
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-4 * g2.abs().max().item())
    print(f"check: logits equal (max |diff| {max_diff:.2e}), loss {l1.item():.6f} vs {l2.item():.6f}, gradients equal")
    del ours, hf

    contenders, warmup_s = {}, {}
    for name, build, fwd_of, compiled in specs:
        model = build()
        opt, loss_of = optimizer_and_loss(fwd_of(model), model.parameters(), lr=1e-4, fused=a.fused_adamw)
        if compiled:
            loss_of = torch.compile(loss_of)

        def step(loss_of=loss_of, opt=opt):
            loss = loss_of(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        if compiled:  # compile warm-up: forward and backward graphs are built on the first step
            t0 = time.perf_counter()
            try:
                step()
                step()
            except Exception as e:  # a contender that does not compile here is reported, not fatal
                print(f"skip {name}: torch.compile failed: {type(e).__name__}: {str(e).splitlines()[0]}")
                continue
            warmup_s[name] = time.perf_counter() - t0
            print(f"compile warm-up {name}: {warmup_s[name]:.1f}s (first two steps)")
        contenders[name] = step
    if not a.no_floor:
        contenders["GEMMs only"] = gemm_floor(ours_model(), tokens)

    times = interleaved(contenders, reps=a.reps, warmup=a.warmup)
    base = "HF eager"
    fpt = flops_per_token(args, a.seq_len)
    rows, result = [], {"benchmark": "cpu_train_step", "machine": info, "config": vars(a), "compile_warmup_s": warmup_s,
                        "results": {}}
    for name, ts in times.items():
        s = stats(ts)
        r = paired_ratio(times[base], ts)
        rows.append([name, f"{s['median'] * 1e3:.0f}", f"{s['min'] * 1e3:.0f}-{s['max'] * 1e3:.0f}",
                     f"{tokens / s['median']:.0f}", f"{fpt * tokens / s['median'] / 1e9:.1f}",
                     f"{r['median']:.2f}x ({r['min']:.2f}-{r['max']:.2f})",
                     f"{warmup_s[name]:.0f}" if name in warmup_s else "-"])
        result["results"][name] = {"seconds": ts, "tok_per_s_median": tokens / s["median"],
                                   "gflop_per_s_median": fpt * tokens / s["median"] / 1e9, "speedup_vs_hf_eager": r}
    print()
    print(fmt_table(["", "ms/step (median)", "ms (min-max)", "tok/s", "GFLOP/s", f"speed vs {base} (paired)",
                     "compile warm-up s"], rows))
    if "GEMMs only" in times:
        c = paired_ratio(times[base], times["GEMMs only"])
        result["ceiling_vs_hf_eager"] = c
        print(f"ceiling: HF eager / GEMMs only = {c['median']:.2f}x: the most any implementation using the same "
              "matmul kernels could gain over HF eager on this machine")
    ours_names = [n for n in times if n.startswith("llamaherd")]
    head = max(ours_names, key=lambda n: result["results"][n]["speedup_vs_hf_eager"]["median"])
    r = result["results"][head]["speedup_vs_hf_eager"]
    result["headline"] = head
    print(f"\nheadline: {head} / HF eager = {r['median']:.2f}x (min {r['min']:.2f}, max {r['max']:.2f}, "
          f"{a.reps} paired rounds); target >= 1.5x: {'met' if r['median'] >= 1.5 else 'NOT met'}")
    write_json(a.out, result)


if __name__ == "__main__":
    main()
