"""FSDP at world size 1 against the unwrapped trainer, activation checkpointing's memory, and `herd plan`'s
memory model against the GPU's measured peak: one GPU, the llama3.2-1b shape.

Four contenders, one after another (each alone on the GPU), eager PyTorch (no compilation: the numbers
compare wrappers, not compilers), batch 4 x 2048 tokens, a step = forward, float32 cross-entropy,
backward, clipping, fused AdamW:

  unwrapped          the model as `herd pretrain` builds it alone: float32 weights, bf16 autocast
  FSDP (world 1)     `apply_fsdp` on a one-rank mesh: bf16 parameters, float32 reduction (what every
                     data-parallel rank runs); the wrapper should cost nothing here (target: within 5%)
  unwrapped + AC     activation checkpointing: the memory it saves, the time it costs
  FSDP + AC

Reported: median step time, tokens/s, TFLOP/s (6N + attention per token), MFU against the bf16 peak, and
the peak memory allocated (torch.cuda.max_memory_allocated), next to `herd plan`'s prediction for the
same run (eager kernels, one GPU).

    python benchmarks/gpu_fsdp.py --out bench-out/gpu_fsdp.json          # about 1.5 minutes on one H100
    python benchmarks/gpu_fsdp.py --device cpu --preset tiny --batch 2 --seq-len 64 --quick   # smoke test
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time

import torch
from common import build_ours, fmt_table, machine, print_machine, write_json

from llamaherd.config import load_config
from llamaherd.model import flops_per_token, preset
from llamaherd.model.masks import doc_mask, doc_positions
from llamaherd.train import metrics
from llamaherd.train.losses import cross_entropy
from llamaherd.train.parallel import apply_activation_checkpointing, apply_fsdp, clip_grad_norm
from llamaherd.train.plan import run_memory
from llamaherd.train.trainer import make_optimizer


def one_rank_mesh(device: str):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)
    return init_device_mesh(device, (1,))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama3.2-1b")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--device", default="cuda")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--quick", action="store_true", help="1 warm-up and 3 timed steps per contender")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    if a.quick:
        a.warmup, a.steps = 1, 3
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: use --device cpu for a smoke test")
    print_machine(machine())
    args = preset(a.preset, max_seq_len=max(a.seq_len, 128))
    cuda = a.device == "cuda"
    amp = torch.bfloat16 if cuda else None
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab_size, (a.batch, a.seq_len + 1), generator=gen).to(a.device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    doc_ids = torch.zeros(a.batch, a.seq_len, dtype=torch.int32, device=a.device)
    flops_tok = flops_per_token(args, a.seq_len)
    peak = metrics.peak_flops(torch.device("cuda", 0)) if cuda else None
    mesh = one_rank_mesh(a.device)
    cfg = load_config("tiny", [f"train.batch_size={a.batch}", f"train.seq_len={a.seq_len}"])
    rows = []
    for name, fsdp, ac in [("unwrapped", False, False), ("FSDP (world 1)", True, False),
                           ("unwrapped + AC", False, True), ("FSDP + AC", True, True)]:
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        model = build_ours(args, device=a.device).train()
        if ac:
            apply_activation_checkpointing(model)
        if fsdp:
            apply_fsdp(model, mesh, param_dtype=amp)
        opt = make_optimizer(model, cfg.train)

        def step(model=model, opt=opt, fsdp=fsdp):
            # FSDP's mixed precision computes in bf16 itself; the unwrapped model autocasts, as the Trainer does
            use_amp = amp is not None and not fsdp
            with torch.autocast(a.device, dtype=amp or torch.bfloat16, enabled=use_amp):
                logits = model(inputs, doc_positions(doc_ids), mask=doc_mask(doc_ids) if not cuda else None)
                loss = cross_entropy(logits, targets)
            loss.backward()
            clip_grad_norm(model, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(a.warmup):
            step()
        times = []
        for _ in range(a.steps):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        tps = a.batch * a.seq_len / med
        cfg.train.activation_checkpointing = ac
        predicted = run_memory(cfg, args, "bf16" if cuda else "fp32")["total"]
        rows.append({"contender": name, "step_ms": med * 1e3, "tokens_per_s": tps, "tflops": tps * flops_tok / 1e12,
                     "mfu": tps * flops_tok / peak if peak else None,
                     "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                     "plan_gib": predicted})
        del model, opt, step
    base = rows[0]["tflops"]
    for r in rows:
        r["vs_unwrapped"] = r["tflops"] / base
    def f(x, fmt):
        return "-" if x is None else format(x, fmt)

    print(fmt_table(["contender", "ms/step", "tokens/s", "TFLOP/s", "MFU", "vs unwrapped", "peak GiB",
                     "plan GiB"],
                    [[r["contender"], f(r["step_ms"], ".1f"), f(r["tokens_per_s"], ",.0f"), f(r["tflops"], ".2f"),
                      f(r["mfu"], ".1%"), f(r["vs_unwrapped"], ".3f"), f(r["peak_gib"], ".2f"),
                      f(r["plan_gib"], ".2f")] for r in rows]))
    write_json(a.out, {"machine": machine(), "preset": a.preset, "batch": a.batch, "seq_len": a.seq_len,
                       "results": rows})


if __name__ == "__main__":
    main()
