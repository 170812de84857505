"""Does the llama3-8b shape train at 8,192 tokens on one 80 GB GPU? The peak memory of real training steps.

The model is built as `herd pretrain` builds it (`llamaherd.train.parallel.build_model`) with the memory-lean
settings: `train.param_dtype=bfloat16` (weights, gradients and AdamW's states in bf16: 8 bytes a parameter),
`train.activation_checkpointing=true` and `train.loss_chunk=1024` (no [tokens, 128K] logits), bf16 autocast;
one row of 8,192 tokens packed from 8 documents (FlexAttention's document mask on a GPU), fused AdamW. Each
step is forward, loss, backward, clipping and the optimizer step; the peak is torch.cuda.max_memory_allocated
over the steps (the optimizer's states exist from the first step on), reported against 80 GB.

    python benchmarks/gpu_memory.py --out bench-out/gpu_memory.json                   # one H100/H200, ~40 s
    python benchmarks/gpu_memory.py --device cpu --preset tiny --seq-len 256 --quick  # smoke test
"""

from __future__ import annotations

import argparse
import time

import torch
from common import fmt_table, machine, print_machine, require_device, write_json

from llamaherd.config import load_config, model_args
from llamaherd.data.loader import Batch
from llamaherd.model import num_params
from llamaherd.train.losses import NextTokenLoss
from llamaherd.train.parallel import build_model, clip_grad_norm
from llamaherd.train.plan import run_memory
from llamaherd.train.trainer import make_optimizer

GIB = 2**30


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--preset", default="llama3-8b")
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--docs", type=int, default=8, help="documents packed into the row")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--loss-chunk", type=int, default=1024)
    p.add_argument("--quick", action="store_true", help="2 steps")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    require_device(a.device)
    if a.quick:
        a.steps = 2
    print_machine(machine())
    cuda = a.device.startswith("cuda")
    cfg = load_config("tiny", [f"model.preset={a.preset}", f"train.seq_len={a.seq_len}", "train.batch_size=1",
                               "train.param_dtype=bfloat16", "train.activation_checkpointing=true",
                               f"train.loss_chunk={a.loss_chunk}", f"train.dtype={'bfloat16' if cuda else 'float32'}"])
    args = model_args(cfg, vocab_size=128_256 if a.preset.startswith("llama3") else None)
    device = torch.device(a.device)
    t0 = time.perf_counter()
    model = build_model(args, cfg, device)
    build_s = time.perf_counter() - t0
    opt = make_optimizer(model, cfg.train)
    loss_fn = NextTokenLoss(chunk_size=a.loss_chunk)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab_size, (1, a.seq_len + 1), generator=gen)
    doc_ids = (torch.arange(a.seq_len) * a.docs // a.seq_len).to(torch.int32)[None]
    batch = Batch(tokens[:, :-1], tokens[:, 1:], doc_ids).to(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for _ in range(a.steps):
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            out = loss_fn(model, batch)
        out.loss.backward()
        clip_grad_norm(model, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss.detach()))
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    n = num_params(args)
    peak = torch.cuda.max_memory_allocated() / GIB if cuda else None
    predicted = run_memory(cfg, args, "bf16" if cuda else "fp32")["total"]  # herd plan's memory model
    row = {"preset": a.preset, "params": n, "seq_len": a.seq_len, "steps": a.steps, "losses": losses,
           "step_s": times, "build_s": build_s, "peak_gib": peak, "plan_gib": predicted, "states_gib": 8 * n / GIB,
           "fits_80gb": None if peak is None else peak < 80 * 0.98}
    print(fmt_table(["preset", "params", "seq", "weights+grads+states GiB", "peak GiB", "plan GiB", "fits 80 GB",
                     "s/step"],
                    [[a.preset, f"{n / 1e9:.2f}B", a.seq_len, f"{row['states_gib']:.1f}",
                      "-" if peak is None else f"{peak:.1f}", f"{predicted:.1f}",
                      "-" if peak is None else str(row["fits_80gb"]),
                      f"{min(times):.2f}"]]))
    write_json(a.out, {"machine": machine(), "settings": vars(a), "results": row})


if __name__ == "__main__":
    main()
