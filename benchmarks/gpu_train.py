"""Training throughput on one GPU: llamaherd's Transformer against Hugging Face's LlamaForCausalLM, same weights.

The llama3.2-1b shape with seeded random weights (float32 master weights), batch 4 x 2048 tokens,
bfloat16 autocast, fused AdamW; a step is forward, cross-entropy (float32), backward and the
optimizer step. Contenders:

  llamaherd compiled          as `herd pretrain` with train.compile=true runs it: each block compiled
                              (llamaherd.train.parallel.parallelize) and the loss compiled;
                              --whole-graph compiles forward + loss as one graph instead
  llamaherd compiled + flex   the same on packed rows of 8 documents: FlexAttention block mask (--doc-mask)
  llamaherd compiled + float8 the block linears in float8 through torchao, as train.float8=true (--ours)
  ... + full / selective AC   activation checkpointing of each block, or of the cheap ops only (--ours)
  llamaherd eager             no compilation (--eager)
  HF eager                    LlamaForCausalLM, SDPA attention
  HF compiled                 torch.compile of the same forward + loss

The models do not all fit in memory together with their optimizer states, so contenders run one
after another (on a dedicated GPU; the CPU benchmarks interleave instead). Each gets warm-up steps
(compilation included, timed apart), then timed steps; the median step time gives tokens/s,
TFLOP/s (llamaherd.model.flops_per_token: 6N + full attention, as nanoGPT and torchtitan count)
and MFU against the dense bf16 peak (989 TFLOP/s for H100 SXM and H200; none for other devices).
A large bf16 matmul measures the achievable TFLOP/s for context. Before timing, float32 logits of
both models must match.

    python benchmarks/gpu_train.py --out bench-out/gpu_train.json             # expected: about 4-5 minutes on one H100
    python benchmarks/gpu_train.py --quick --out bench-out/gpu_train.json     # fewer steps, expected: about 3 minutes
    python benchmarks/gpu_train.py --device cpu --preset tiny --batch 2 --seq-len 64 --amp none --eager \\
        --no-compile --quick                                                  # smoke test
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch
import torch.nn.functional as F
from common import (
    assert_same_logits,
    build_hf,
    build_ours,
    fmt_table,
    machine,
    print_machine,
    require_device,
    timed,
    write_json,
)

from llamaherd.config import load_config
from llamaherd.model import flops_per_token, num_params, preset
from llamaherd.model.masks import doc_mask, doc_positions
from llamaherd.train import metrics
from llamaherd.train.losses import cross_entropy
from llamaherd.train.parallel import parallelize


def peak_flops() -> float | None:
    """Dense bf16 peak of this GPU from the trainer's table (None: unknown part, no MFU)."""
    return metrics.peak_flops(torch.device("cuda", 0)) if torch.cuda.is_available() else None


def matmul_tflops(device: str, n: int = 8192, reps: int = 10) -> float:
    """Achieved bf16 TFLOP/s of an n x n x n matmul: the practical ceiling for the big matmuls."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    a @ b
    secs = timed(lambda: [a @ b for _ in range(reps)])
    return 2 * n**3 * reps / secs / 1e12


def random_doc_ids(batch: int, seq: int, docs: int, gen: torch.Generator) -> torch.Tensor:
    """[batch, seq] document numbers: each row cut into ``docs`` documents at random places."""
    rows = []
    for _ in range(batch):
        cuts = torch.randperm(seq - 1, generator=gen)[: docs - 1] + 1
        starts = torch.zeros(seq, dtype=torch.long)
        starts[cuts] = 1
        rows.append(starts.cumsum(0))
    return torch.stack(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama3.2-1b")
    p.add_argument("--vocab-size", type=int, default=None, help="override the preset's vocabulary size")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--amp", default="bfloat16", choices=["bfloat16", "none"], help="autocast dtype")
    p.add_argument("--device", default="cuda")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per contender (compilation included)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per contender")
    p.add_argument("--doc-mask", action="store_true", help="add llamaherd compiled on packed rows (flex block mask)")
    p.add_argument("--docs", type=int, default=8, help="documents per packed row with --doc-mask")
    p.add_argument("--eager", action="store_true", help="add llamaherd eager")
    p.add_argument("--ours", default=None,
                   help="exactly these of our contenders, comma-separated: compiled, flex, float8, flex-float8, "
                        "flex-ac (activation checkpointing, each block), flex-ac-op (selective: matmul outputs "
                        "kept), eager (default: compiled, + flex with --doc-mask, + eager with --eager); "
                        "float8 needs torchao")
    p.add_argument("--whole-graph", action="store_true",
                   help="compile llamaherd's forward + loss as one graph, as HF compiled is (default: as the trainer)")
    p.add_argument("--no-compile", action="store_true", help="skip every compiled contender")
    p.add_argument("--no-hf", action="store_true", help="skip every Hugging Face contender")
    p.add_argument("--no-hf-compile", action="store_true", help="skip HF compiled")
    p.add_argument("--quick", action="store_true", help="2 warm-up and 4 timed steps per contender")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    a = p.parse_args()
    if a.quick:
        a.warmup, a.steps = min(a.warmup, 2), min(a.steps, 4)
    require_device(a.device)
    t_start = time.perf_counter()
    cuda = a.device.startswith("cuda")

    info = machine()
    print_machine(info)
    over = {} if a.vocab_size is None else {"vocab_size": a.vocab_size}
    args = preset(a.preset, **over)
    tokens = a.batch * a.seq_len
    fpt = flops_per_token(args, a.seq_len)
    peak = peak_flops()
    print(f"config: preset {a.preset} ({num_params(args) / 1e9:.2f}B params, dim {args.dim}, {args.n_layers} layers, "
          f"{args.n_heads}/{args.n_kv_heads} heads, vocab {args.vocab_size}), batch {a.batch} x {a.seq_len}, "
          f"autocast {a.amp}, AdamW (fused); {fpt / 1e9:.2f} GFLOP/token; peak "
          f"{f'{peak / 1e12:.0f} TFLOP/s' if peak else 'unknown (no MFU)'}")
    result = {"benchmark": "gpu_train", "machine": info, "config": vars(a), "flops_per_token": fpt, "peak_flops": peak,
              "results": {}}
    if cuda:
        result["matmul_tflops"] = matmul_tflops(a.device)
        print(f"bf16 matmul 8192^3: {result['matmul_tflops']:.0f} TFLOP/s")

    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, args.vocab_size, (a.batch, a.seq_len), generator=g).to(a.device)
    y = torch.randint(0, args.vocab_size, (a.batch, a.seq_len), generator=g).to(a.device)
    doc_ids = random_doc_ids(a.batch, a.seq_len, a.docs, g).to(a.device)

    if not a.no_hf:  # the honesty check: same float32 logits
        ours = build_ours(args, seed=0, device=a.device).eval()
        hf = build_hf(ours)
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            diff = assert_same_logits(ours, hf, x[:1, :256], rtol=1e-4, atol_scale=1e-4)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
        result["check_float32_max_abs_diff"] = diff
        print(f"check: float32 logits equal (max |diff| {diff:.2e})")
        del ours, hf

    def ours_model():
        return build_ours(args, seed=0, device=a.device).train()

    def hf_model():
        return build_hf(build_ours(args, seed=0, device=a.device)).train()

    def with_docs(m):
        positions, mask = doc_positions(doc_ids), doc_mask(doc_ids)  # a FlexAttention BlockMask on CUDA
        return lambda t: m(t, positions, mask=mask)

    plain = lambda m: m  # noqa: E731
    flex = f"flex ({a.docs} docs/row)"
    variants = {  # --ours: name, forward, compiled, the trainer settings it runs with
        "compiled": ("llamaherd compiled", plain, True, []),
        "flex": (f"llamaherd compiled + {flex}", with_docs, True, []),
        "float8": ("llamaherd compiled + float8", plain, True, ["train.float8=true"]),
        "flex-float8": (f"llamaherd compiled + {flex} + float8", with_docs, True, ["train.float8=true"]),
        "flex-ac": (f"llamaherd compiled + {flex} + full AC", with_docs, True, ["train.activation_checkpointing=true"]),
        "flex-ac-op": (f"llamaherd compiled + {flex} + selective AC", with_docs, True,
                       ["train.activation_checkpointing=true", "train.ac_policy=op"]),
        "eager": ("llamaherd eager", plain, False, []),
    }
    if a.ours is not None:
        chosen = [v.strip() for v in a.ours.split(",") if v.strip()]
        unknown = [v for v in chosen if v not in variants]
        if unknown:
            raise SystemExit(f"--ours {','.join(unknown)}: expected some of {', '.join(variants)}")
    else:
        chosen = [] if a.no_compile else ["compiled"] + (["flex"] if a.doc_mask else [])
        chosen += ["eager"] if a.eager or a.no_compile else []
    specs = []  # (name, build, forward(model) -> fn(x) -> logits, compiled, trainer settings)
    for v in chosen:
        name, fwd, compiled, settings = variants[v]
        specs.append((name, ours_model, fwd, compiled, settings))
    if not a.no_hf:
        hf_fwd = lambda m: (lambda t: m(input_ids=t, use_cache=False).logits)  # noqa: E731
        specs.append(("HF eager", hf_model, hf_fwd, False, []))
        if not a.no_compile and not a.no_hf_compile:
            specs.append(("HF compiled", hf_model, hf_fwd, True, []))

    device_type, use_amp = a.device.split(":")[0], a.amp == "bfloat16"
    rows = []
    for name, build, forward_of, compiled, settings in specs:
        print(f"{name}: ", end="", flush=True)
        model = fwd = opt = loss_of = step = None
        try:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            model = build()
            if settings and (not compiled or a.whole_graph):  # else applied with the compilation below
                parallelize(model, load_config(None, settings))
            fwd = forward_of(model)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)

            if compiled and name.startswith("llamaherd") and not a.whole_graph:
                # exactly what `herd pretrain` with train.compile=true runs: each block compiled, and the loss
                parallelize(model, load_config(None, ["train.compile=true", *settings]))
                compiled_loss = torch.compile(cross_entropy)

                def loss_of(t, target, fwd=fwd, compiled_loss=compiled_loss):
                    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=use_amp):
                        logits = fwd(t)
                    return compiled_loss(logits, target)
            else:
                def loss_of(t, target, fwd=fwd):
                    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=use_amp):
                        logits = fwd(t)
                    return F.cross_entropy(logits.float().flatten(0, 1), target.flatten())

                if compiled:
                    loss_of = torch.compile(loss_of)

            def step(loss_of=loss_of, opt=opt):
                loss = loss_of(x, y)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                return loss

            warm = timed(lambda step=step: [step() for _ in range(a.warmup)])
            times = [timed(step) for _ in range(a.steps)]
            loss = step().item()
        except Exception as e:  # one failing contender (OOM, compile error) must not lose the others
            msg = str(e).splitlines()[0] if str(e) else ""
            print(f"FAILED: {type(e).__name__}: {msg}")
            result["results"][name] = {"error": f"{type(e).__name__}: {msg}"}
            rows.append([name, "failed", "", "", "", "", "", ""])
        else:
            med = statistics.median(times)
            tflops = fpt * tokens / med / 1e12
            mem = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
            print(f"warm-up {warm:.1f}s, step {med * 1e3:.1f} ms (min {min(times) * 1e3:.1f}, max "
                  f"{max(times) * 1e3:.1f}), loss {loss:.3f}", flush=True)
            result["results"][name] = {"step_seconds": times, "warmup_seconds": warm, "tok_per_s": tokens / med,
                                       "tflops": tflops, "mfu": tflops * 1e12 / peak if peak else None,
                                       "max_memory_gib": mem, "final_loss": loss}
            rows.append([name, f"{med * 1e3:.1f}", f"{min(times) * 1e3:.1f}-{max(times) * 1e3:.1f}",
                         f"{tokens / med:,.0f}", f"{tflops:.1f}", f"{tflops * 1e12 / peak:.1%}" if peak else "-",
                         f"{mem:.1f}" if mem is not None else "-", f"{warm:.0f}"])
        finally:
            model = fwd = opt = loss_of = step = None  # drop every reference before the next contender
            torch._dynamo.reset()
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
            write_json(a.out, result)  # after every contender: a run stopped at its time limit keeps what it has

    print()
    print(fmt_table(["", "ms/step (median)", "ms (min-max)", "tok/s", "TFLOP/s", "MFU", "peak GiB",
                     "warm-up s"], rows))
    res = result["results"]
    if "HF eager" in res and "tok_per_s" in res["HF eager"]:
        for r in res.values():
            if "tok_per_s" in r:
                r["speedup_vs_hf_eager"] = r["tok_per_s"] / res["HF eager"]["tok_per_s"]
        print("speed vs HF eager: " + ", ".join(f"{n} {r['speedup_vs_hf_eager']:.2f}x"
                                                for n, r in res.items() if "speedup_vs_hf_eager" in r))
    result["total_wall_s"] = time.perf_counter() - t_start
    print(f"total wall time {result['total_wall_s']:.0f}s")
    write_json(a.out, result)


if __name__ == "__main__":
    main()
