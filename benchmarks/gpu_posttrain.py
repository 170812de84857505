"""Peak GPU memory and training tokens/s of LoRA SFT against full SFT: one GPU, the llama3.2-1b shape.

Each mode runs in a process of its own (this script re-invoked with --mode), so that each peak is its own:

  full    every weight trains: AdamW moments and gradients for all of them
  lora    apply_lora with LoRAConfig's defaults (rank 8, alpha 16, on wq wk wv wo; --lora-* to change):
          the base weights are frozen, only the adapters train (and hold gradients and AdamW moments)

Set up as `herd sft` runs on a GPU, from the sft recipe: float32 weights (what start_from loads), bfloat16
autocast (train.dtype=auto), eager PyTorch (no compilation, no activation checkpointing), the Trainer's
optimizer (make_optimizer: fused AdamW over the parameters that train), gradient clipping at 1.0. Seeded
random weights, nothing downloaded. Batch 4 x 2048 tokens of random ids; the targets are the next tokens,
the first quarter of each row masked with -100 as SFT masks a prompt, the loss the float32 cross-entropy
over the rest (llamaherd.train.losses.cross_entropy). One document a row: causal attention (SDPA), where
`herd sft` packs conversations under a FlexAttention document mask; the weights, gradients and optimizer
state, which LoRA changes, are the same either way.

A step is forward, loss, backward, clipping and the optimizer step. Warm-up steps first, then timed steps
(torch.cuda.synchronize around each); the median step time gives tokens/s (batch x seq_len a step, as the
Trainer counts). Memory: torch.cuda.max_memory_allocated over the whole run of the mode, model creation
included (peak statistics reset before it), next to the memory held once the model is built, and the
static part counted from the parameters (4 bytes a weight, + 12 a trainable one: its gradient and two
AdamW moments); each process's peak resident set (VmHWM) too, the only memory figure with --device cpu.
Reported per mode and as ratios lora / full.

    python benchmarks/gpu_posttrain.py --out bench-out/gpu_posttrain.json           # expected: about 1 minute
    python benchmarks/gpu_posttrain.py --quick --out bench-out/gpu_posttrain.json   # expected: well under 90 s
    python benchmarks/gpu_posttrain.py --device cpu --preset tiny --quick           # smoke test (batch 2 x 128)
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import ROOT, add_threads_argument, fmt_table, machine, print_machine, set_threads, timed, write_json

MODES = ("full", "lora")


def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- one mode, in its own process ------------------------------------------------------------------------


def run_mode(mode: str, spec: dict) -> dict:
    from common import build_ours

    from llamaherd.config import load_config
    from llamaherd.model import preset
    from llamaherd.posttrain.lora import LoRAConfig, apply_lora, lora_parameter_count, trainable_parameters
    from llamaherd.train.distributed import autocast_dtype
    from llamaherd.train.losses import cross_entropy
    from llamaherd.train.parallel import clip_grad_norm
    from llamaherd.train.trainer import make_optimizer

    device = torch.device(spec["device"])
    cuda = device.type == "cuda"
    batch, seq_len = spec["batch"], spec["seq_len"]
    overrides = [f"train.batch_size={batch}", f"train.seq_len={seq_len}"]
    if mode == "lora":
        overrides += [f"lora.rank={spec['lora_rank']}", f"lora.alpha={spec['lora_alpha']}",
                      f"lora.targets={json.dumps(spec['lora_targets'])}"]
    cfg = load_config("sft", overrides)  # the recipe `herd sft` starts from
    args = preset(spec["preset"])
    if seq_len > args.max_seq_len:
        args = preset(spec["preset"], max_seq_len=seq_len)

    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab_size, (batch, seq_len + 1), generator=gen)
    inputs, targets = tokens[:, :-1].to(device), tokens[:, 1:].clone()
    targets[:, : seq_len // 4] = -100  # the "prompt": no loss, as SFT masks it
    targets = targets.to(device)

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    model = build_ours(args, seed=0, device=device).train()  # float32, as start_from loads the base
    if cfg.lora.rank > 0:  # as start_from applies it
        torch.manual_seed(cfg.train.seed)
        lora = LoRAConfig(rank=cfg.lora.rank, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                          targets=tuple(cfg.lora.targets))
        apply_lora(model, lora)
        expected = lora_parameter_count(args, lora)
        if trainable_parameters(model) != expected:
            raise RuntimeError(f"LoRA trains {trainable_parameters(model):,} parameters; its shape says {expected:,}")
    optimizer = make_optimizer(model, cfg.train)
    amp = autocast_dtype(cfg.train.dtype, device)
    if cuda:
        torch.cuda.synchronize(device)
    built_gib = torch.cuda.memory_allocated(device) / 2**30 if cuda else None

    def step() -> torch.Tensor:
        with torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
            logits = model(inputs)
            loss = cross_entropy(logits, targets)
        loss.backward()
        clip_grad_norm(model, cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    warm = timed(lambda: [step() for _ in range(spec["warmup"])])
    losses, times = [], []
    for _ in range(spec["steps"]):
        times.append(timed(lambda: losses.append(step())))
    total = sum(p.numel() for p in model.parameters())
    trainable = trainable_parameters(model)
    med = statistics.median(times)
    result = {
        "trainable_params": trainable,
        "total_params": total,
        "static_gib_counted": (4 * total + 12 * trainable) / 2**30,
        "built_gib": built_gib,
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30 if cuda else None,
        "peak_rss_mib": peak_rss_mib(),
        "step_seconds": times,
        "step_ms": med * 1e3,
        "tokens_per_s": batch * seq_len / med,
        "warmup_seconds": warm,
        "final_loss": float(losses[-1]) if losses else None,
        "autocast": str(amp).removeprefix("torch.") if amp else None,
        "lora": {"rank": cfg.lora.rank, "alpha": cfg.lora.alpha, "targets": list(cfg.lora.targets)}
        if mode == "lora" else None,
    }
    return result


def child(mode: str, spec_json: str) -> None:
    spec = json.loads(spec_json)
    set_threads(spec["threads"])
    t0 = time.perf_counter()
    try:
        result = run_mode(mode, spec)
    except Exception as e:  # an OOM in one mode is a result too: the parent reports it and runs the other
        msg = str(e).splitlines()[0] if str(e) else ""
        print("RESULT " + json.dumps({"error": f"{type(e).__name__}: {msg}"}), flush=True)
        raise
    result["wall_s"] = time.perf_counter() - t0
    print("RESULT " + json.dumps(result), flush=True)


def run_child(mode: str, spec: dict) -> dict:
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--mode", mode, "--spec", json.dumps(spec)],
                          capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    result = json.loads(lines[-1].removeprefix("RESULT ")) if lines else {}
    if proc.returncode or "error" in result or not lines:
        result.setdefault("error", f"exit status {proc.returncode}")
        result["stderr_tail"] = proc.stderr[-4000:]
    return result


# --- the run ----------------------------------------------------------------------------------------------


def main() -> None:
    from llamaherd.model import num_params, preset
    from llamaherd.posttrain.lora import LoRAConfig

    default_lora = LoRAConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama3.2-1b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=None, help="rows a step (default 4; 2 with --device cpu)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens a row (default 2048; 128 with --device cpu)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first, per mode")
    p.add_argument("--steps", type=int, default=10, help="timed steps per mode")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of: " + ", ".join(MODES))
    p.add_argument("--lora-rank", type=int, default=default_lora.rank)
    p.add_argument("--lora-alpha", type=float, default=default_lora.alpha)
    p.add_argument("--lora-targets", default=",".join(default_lora.targets),
                   help="comma-separated, any of wq wk wv wo w1 w2 w3")
    p.add_argument("--quick", action="store_true", help="2 warm-up and 5 timed steps per mode")
    add_threads_argument(p)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--mode", default=None, help=argparse.SUPPRESS)  # the child process
    p.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.mode:
        return child(a.mode, a.spec)
    if a.quick:
        a.warmup, a.steps = min(a.warmup, 2), min(a.steps, 5)
    cuda = a.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        sys.exit("error: no CUDA device (this script is for a GPU; --device cpu runs a smoke test)")
    a.batch = a.batch or (4 if cuda else 2)
    a.seq_len = a.seq_len or (2048 if cuda else 128)
    modes = a.modes.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        sys.exit(f"error: unknown mode(s) {', '.join(unknown)}; expected some of {', '.join(MODES)}")
    set_threads(a.threads)
    t_start = time.perf_counter()

    info = machine()
    print_machine(info)
    args = preset(a.preset)
    targets = a.lora_targets.split(",")
    print(f"config: preset {a.preset} ({num_params(args) / 1e6:,.0f}M params, dim {args.dim}, {args.n_layers} layers, "
          f"vocab {args.vocab_size}), batch {a.batch} x {a.seq_len}, float32 weights, "
          f"{'bf16 autocast' if cuda else 'no autocast'}, fused AdamW (make_optimizer), eager; {a.warmup} warm-up + "
          f"{a.steps} timed steps per mode; LoRA rank {a.lora_rank}, alpha {a.lora_alpha:g} on {' '.join(targets)}")
    spec = {"preset": a.preset, "device": a.device, "batch": a.batch, "seq_len": a.seq_len, "warmup": a.warmup,
            "steps": a.steps, "threads": a.threads, "lora_rank": a.lora_rank, "lora_alpha": a.lora_alpha,
            "lora_targets": targets}
    result = {"benchmark": "gpu_posttrain", "machine": info, "config": vars(a), "results": {}, "ratios": {}}
    failed = False
    for mode in modes:
        print(f"{mode}: ", end="", flush=True)
        r = run_child(mode, spec)
        result["results"][mode] = r
        if "error" in r:
            failed = True
            print(f"FAILED: {r['error']}\n{r['stderr_tail']}", flush=True)
        else:
            mem = (f"peak {r['peak_gib']:.2f} GiB" if r["peak_gib"] is not None
                   else f"peak RSS {r['peak_rss_mib']:.0f} MiB")
            print(f"{r['trainable_params']:,} trainable, step {r['step_ms']:.1f} ms, {r['tokens_per_s']:,.0f} tok/s, "
                  f"{mem}, loss {r['final_loss']:.3f} ({r['wall_s']:.0f} s in all)", flush=True)
        write_json(a.out, result)  # after every mode: a run stopped at its time limit keeps what it has

    res = {m: r for m, r in result["results"].items() if "error" not in r}

    def f(x, fmt):
        return "-" if x is None else format(x, fmt)

    print()
    print(fmt_table(["", "trainable params", "total params", "ms/step", "tok/s", "built GiB", "peak GiB",
                     "weights+grads+AdamW GiB", "peak RSS MiB"],
                    [[m, f"{r['trainable_params']:,}", f"{r['total_params']:,}", f(r["step_ms"], ".1f"),
                      f(r["tokens_per_s"], ",.0f"), f(r["built_gib"], ".2f"), f(r["peak_gib"], ".2f"),
                      f(r["static_gib_counted"], ".2f"), f(r["peak_rss_mib"], ".0f")] for m, r in res.items()]))
    if "full" in res and "lora" in res:
        full, lora = res["full"], res["lora"]
        ratios = {"trainable_params": lora["trainable_params"] / full["trainable_params"],
                  "tokens_per_s": lora["tokens_per_s"] / full["tokens_per_s"],
                  "peak_gib": lora["peak_gib"] / full["peak_gib"] if full["peak_gib"] else None,
                  "peak_rss_mib": lora["peak_rss_mib"] / full["peak_rss_mib"]}
        result["ratios"] = ratios
        result["peak_gib_saved"] = full["peak_gib"] - lora["peak_gib"] if full["peak_gib"] is not None else None
        print()
        print(fmt_table(["lora / full", "ratio"],
                        [["peak memory allocated", f(ratios["peak_gib"], ".3f")],
                         ["tokens/s", f(ratios["tokens_per_s"], ".3f")],
                         ["trainable params", f(ratios["trainable_params"], ".5f")],
                         ["peak RSS (host)", f(ratios["peak_rss_mib"], ".3f")]]))
    result["total_wall_s"] = time.perf_counter() - t_start
    print(f"total wall time {result['total_wall_s']:.0f}s")
    write_json(a.out, result)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
