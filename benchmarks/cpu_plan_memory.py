"""`herd plan`'s memory model against the real peak memory of a training run on this machine's CPU.

One process trains a small model (float32, eager PyTorch, AdamW) for two steps, in a child process of its
own, under PyTorch's own memory tracker (``torch.distributed._tools.mem_tracker.MemTracker``: every tensor
the run allocates, by kind — parameters, gradients, optimizer state, activations, temporaries); its peak is
the measurement. The process's resident memory above what it held before building the model is shown too
(it adds the allocator's caching and fragmentation). The same run is costed by
``llamaherd.train.plan.run_memory``. The ratio must be within 20% (tests/test_plan.py runs the small shape).

    python benchmarks/cpu_plan_memory.py                       # three shapes
    python benchmarks/cpu_plan_memory.py --dim 512 --layers 4 --batch 8 --seq 256
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys
import torch
from llamaherd.config import load_config, model_args
from llamaherd.data.loader import Batch
from llamaherd.train.losses import NextTokenLoss
from llamaherd.train.parallel import build_model
from llamaherd.train.trainer import make_optimizer
from llamaherd.train.plan import run_memory

torch.set_num_threads(1)
overrides = json.loads(sys.argv[1])
cfg = load_config("tiny", overrides)
args = model_args(cfg, vocab_size=cfg.model.overrides["vocab_size"])
B, S = cfg.train.batch_size, cfg.train.seq_len
g = torch.Generator().manual_seed(0)
tokens = torch.randint(0, args.vocab_size, (B, S + 1), generator=g)
batch = Batch(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), torch.zeros(B, S, dtype=torch.int32))
page = resource.getpagesize()
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
from torch.distributed._tools.mem_tracker import MemTracker
before = rss()
model = build_model(args, cfg, torch.device("cpu"))
opt = make_optimizer(model, cfg.train)
loss = NextTokenLoss(chunk_size=cfg.train.loss_chunk)
tracker = MemTracker()
tracker.track_external(model, opt)
with tracker:
    for _ in range(2):  # the second step has the optimizer's state too
        out = loss(model, batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        tracker.reset_mod_stats()
peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
parts = {str(k).split(".")[-1].lower(): v / 2**30 for k, v in peak.items()}
print(json.dumps({"measured_gib": parts.pop("total"), "measured": parts, "rss_gib": (rss_peak - before) / 2**30,
                  "predicted": run_memory(cfg, args)}))
"""


def measure(dim: int, layers: int, batch: int, seq: int, vocab: int = 4096, extra=()) -> dict:
    """Measured and predicted peak of two training steps; ``extra``: more overrides (e.g. train.loss_chunk=256)."""
    overrides = [f"model.dim={dim}", f"model.n_layers={layers}", "model.n_heads=8", "model.n_kv_heads=2",
                 "model.multiple_of=64", f"model.vocab_size={vocab}", f"train.batch_size={batch}",
                 f"train.seq_len={seq}", *extra]
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(overrides)], capture_output=True, text=True,
                          timeout=600)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["ratio"] = out["predicted"]["total"] / out["measured_gib"]
    out["shape"] = dict(dim=dim, layers=layers, batch=batch, seq=seq, vocab=vocab)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    a = p.parse_args()
    shapes = [(a.dim, a.layers, a.batch, a.seq)] if a.dim else [(512, 4, 8, 256), (768, 6, 8, 512), (1024, 4, 4, 1024)]
    print(f"{'shape':<30}{'tracked peak GiB':>17}{'predicted GiB':>15}{'ratio':>7}{'RSS peak GiB':>14}  "
          "tracked / predicted parts")
    for dim, layers, batch, seq in shapes:
        r = measure(dim, layers, batch, seq)
        got = ", ".join(f"{k} {v:.3f}" for k, v in r["measured"].items() if v)
        want = ", ".join(f"{k} {v:.3f}" for k, v in r["predicted"].items() if k != "total" and v)
        print(f"{f'dim {dim}, {layers} layers, {batch} x {seq}':<30}{r['measured_gib']:>17.3f}"
              f"{r['predicted']['total']:>15.3f}{r['ratio']:>7.2f}{r['rss_gib']:>14.3f}  {got} / {want}")


if __name__ == "__main__":
    main()
