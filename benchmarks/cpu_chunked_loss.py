"""The chunked head + cross-entropy (``train.loss_chunk``) against the plain one, over Llama 3's 128K vocabulary:
forward + backward time, and the memory each keeps for backward, side by side in one run.

Contenders, each given the same final hidden states [tokens, dim], head weight [128256, dim] and targets
(every 50th ignored), each computing the summed loss and its gradients for the hidden states and the weight:

  plain        logits = hidden @ W.T ([tokens, vocab]), then llamaherd's ``cross_entropy`` (float32 upcast,
               F.cross_entropy): what ``NextTokenLoss`` does with train.loss_chunk = 0
  chunked C    ``chunked_cross_entropy(hidden, W, targets, C)``: C tokens of logits at a time, forward and
               backward (the backward recomputes each chunk's logits): train.loss_chunk = C

Before timing, both must give the same loss and gradients (float32: 1e-5 relative; bf16: 1e-2 relative).
Memory: the bytes autograd saves for backward (``saved_tensors_hooks``, each storage once, the hidden
states and the weight themselves left out: both paths keep them); on CUDA also the peak allocated during
forward + backward above what was allocated before (``torch.cuda.max_memory_allocated``).

CPU: float32, dim 512 (2048 is a minute a matmul on one thread), 2048 tokens, one thread by default.
GPU: bf16 autocast over float32 inputs (as training runs), dim 2048 (llama3.2-1b), 8192 tokens (4 x 2048).

    python benchmarks/cpu_chunked_loss.py                       # CPU, about 3 minutes on one thread
    python benchmarks/cpu_chunked_loss.py --quick               # CPU smoke test: dim 256, 1024 tokens, ~40 s
    python benchmarks/cpu_chunked_loss.py --device cuda --quick # one GPU, well under 30 s
"""

from __future__ import annotations

import argparse
from contextlib import nullcontext

import torch
from common import (
    add_threads_argument,
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

from llamaherd.train.losses import chunked_cross_entropy, cross_entropy


def inputs(tokens: int, dim: int, vocab: int, device: str, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(tokens, dim, generator=g, device=device).requires_grad_()
    weight = (torch.randn(vocab, dim, generator=g, device=device) * dim**-0.5).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), generator=g, device=device)
    targets[::50] = -100
    return hidden, weight, targets


def saved_bytes_beyond(fn, keep: tuple[torch.Tensor, ...]) -> int:
    """Bytes of the tensors autograd saves for backward while ``fn()`` runs, each storage once, ``keep``'s
    storages left out."""
    seen = {t.untyped_storage().data_ptr() for t in keep}
    total = 0

    def pack(t):
        nonlocal total
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def peak_cuda_bytes(step) -> int | None:
    """The most memory allocated during ``step()`` above what was allocated before it (CUDA only)."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--vocab", type=int, default=128_256)
    p.add_argument("--dim", type=int, default=None, help="default: 512 on CPU, 2048 on a GPU")
    p.add_argument("--tokens", type=int, default=None, help="default: 2048 on CPU, 8192 on a GPU")
    p.add_argument("--chunks", default=None, help="chunk sizes, comma-separated (default: 512 on CPU, 1024,4096 on "
                                                  "a GPU)")
    p.add_argument("--reps", type=int, default=None, help="timed rounds (default: 3 on CPU, 10 on a GPU)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per contender")
    p.add_argument("--dtype", choices=["auto", "float32", "bf16"], default="auto",
                   help="bf16: under bf16 autocast (auto: on a GPU; float32 on CPU)")
    p.add_argument("--quick", action="store_true", help="CPU: dim 256, 1024 tokens, 2 rounds; GPU: 5 rounds")
    add_threads_argument(p)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    a = p.parse_args()
    require_device(a.device)
    set_threads(a.threads)
    cuda = a.device.startswith("cuda")
    dim = a.dim or (2048 if cuda else 256 if a.quick else 512)
    tokens = a.tokens or (8192 if cuda else 1024 if a.quick else 2048)
    chunks = [int(c) for c in (a.chunks or ("1024,4096" if cuda else "512")).split(",")]
    reps = a.reps or (5 if cuda and a.quick else 10 if cuda else 2 if a.quick else 3)
    amp = torch.bfloat16 if a.dtype == "bf16" or (a.dtype == "auto" and cuda) else None

    info = machine()
    print_machine(info)
    print(f"config: {tokens} tokens, dim {dim}, vocab {a.vocab}, "
          f"{'bf16 autocast over float32' if amp else 'float32'}, summed loss, forward + backward (hidden and weight)")
    hidden, weight, targets = inputs(tokens, dim, a.vocab, a.device)

    def autocast():
        return torch.autocast(a.device.split(":")[0], dtype=amp) if amp else nullcontext()

    def plain_loss():
        return cross_entropy((hidden @ weight.t()).unsqueeze(0), targets.unsqueeze(0), "sum")

    losses = {"plain": plain_loss}
    for c in chunks:
        losses[f"chunked {c}"] = lambda c=c: chunked_cross_entropy(hidden, weight, targets, c, "sum")

    def step_of(loss_fn):
        def step():
            with autocast():
                loss = loss_fn()
            return loss, torch.autograd.grad(loss, (hidden, weight))
        return step

    steps = {name: step_of(fn) for name, fn in losses.items()}

    # honesty check: the same loss and gradients before any timing
    tol = 1e-2 if amp else 1e-5
    ref_loss, ref_grads = steps["plain"]()
    checks = {}
    for name in losses:
        if name == "plain":
            continue
        loss, grads = steps[name]()
        loss, ref = loss.item(), ref_loss.item()
        errs = {"loss": abs(loss - ref) / abs(ref),
                "grad_hidden": rel(grads[0], ref_grads[0]), "grad_weight": rel(grads[1], ref_grads[1])}
        bad = {k: v for k, v in errs.items() if v > tol}
        if bad:
            raise SystemExit(f"error: {name} differs from plain beyond {tol:g} (relative): {bad}")
        checks[name] = errs
        print(f"check {name}: loss {loss:.6f} vs {ref:.6f}, relative error loss "
              f"{errs['loss']:.1e}, grad hidden {errs['grad_hidden']:.1e}, grad weight {errs['grad_weight']:.1e}")
    del ref_grads

    memory = {}
    for name, fn in losses.items():
        with autocast():
            saved = saved_bytes_beyond(fn, (hidden, weight))
        memory[name] = {"saved_for_backward_bytes": saved, "peak_bytes": peak_cuda_bytes(steps[name])}

    times = interleaved(steps, reps=reps, warmup=a.warmup)
    logits_f32 = tokens * a.vocab * 4
    rows, result = [], {"benchmark": "cpu_chunked_loss", "machine": info,
                        "config": {**vars(a), "dim": dim, "tokens": tokens, "chunks": chunks, "reps": reps,
                                   "dtype": "bf16 autocast" if amp else "float32"},
                        "float32_logits_bytes": logits_f32, "checks": checks, "results": {}}
    base_saved, base_peak = memory["plain"]["saved_for_backward_bytes"], memory["plain"]["peak_bytes"]
    for name, ts in times.items():
        s, r, m = stats(ts), paired_ratio(times["plain"], ts), memory[name]
        saved, peak = m["saved_for_backward_bytes"], m["peak_bytes"]
        rows.append([name, f"{s['median'] * 1e3:.0f}", f"{s['min'] * 1e3:.0f}-{s['max'] * 1e3:.0f}",
                     f"{r['median']:.2f}x ({r['min']:.2f}-{r['max']:.2f})", size(saved),
                     f"{base_saved / max(saved, 1):.0f}x", "-" if peak is None else size(peak),
                     "-" if peak is None else f"{base_peak / peak:.1f}x"])
        result["results"][name] = {"seconds": ts, "speed_vs_plain": r, **m}
    print()
    print(fmt_table(["", "ms fwd+bwd (median)", "ms (min-max)", "speed vs plain (paired)", "saved for backward",
                     "plain / this", "peak (CUDA)", "plain / this"], rows))
    print(f"\nthe [tokens, vocab] float32 logits alone: {logits_f32 / 2**20:.0f} MiB")
    write_json(a.out, result)


if __name__ == "__main__":
    main()
