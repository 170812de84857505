"""Batch-1 decoding with weight-only int8 / int4 quantised weights against floating-point ones, in one run.

Decoding one token reads every weight once, so tokens/s follows the bytes of the weights. This script
builds one model with seeded random weights, makes quantised copies with ``llamaherd.model.quant.quantize``
(as ``herd generate --quant`` does) and, when torchao is installed, with torchao's weight-only configs
(the peer), and times ``llamaherd.generate`` on each, side by side (interleaved rounds, see common.py).
Tokens/s counts new tokens over the whole call (prefill included). The weight memory of each model
counts every tensor it holds, embeddings included (RoPE tables and the KV cache excluded).

Contenders (``--contenders``; defaults per device):

  float32     CPU: the float32 model with its weights in the memory order ``prepare_for_decoding`` gives
              them, which is what ``herd generate`` runs for a float32 checkpoint
  bfloat16    the model in bfloat16 (``herd generate --dtype bfloat16``; on a GPU, the default)
  int8        int8 per output channel, output head too, bfloat16 activations (``--quant int8``)
  int8-plain  the same weights, multiplied as int8 -> bfloat16 then scaled (no fused kernel; under
              ``--compile`` on a GPU inductor fuses it, as gpt-fast does)
  int4        int4 in groups of ``--group-size``, output head in bfloat16 (``--quant int4``)
  torchao-int8, torchao-int4   torchao 0.18's Int8WeightOnlyConfig and its int4 weight-only config
              (CPU: the prototype tinygemm-for-CPU layout; CUDA: tile_packed_to_4d), same scope

Before timing, each quantised model's next-token choices are compared with the float model's along
the float model's greedy continuation (teacher-forced top-1 agreement; reported, not asserted:
random weights give near-flat logits, see tests/test_quant.py for the stated tolerances).

    python benchmarks/cpu_quant.py --out bench-out/cpu_quant.json       # about 2-3 minutes on 2 cores
    python benchmarks/cpu_quant.py --device cuda --compile --out bench-out/gpu_quant.json   # llama3-8b shape
    python benchmarks/cpu_quant.py --device cuda --compile --contenders bfloat16,int8,int4 --reps 3   # quicker
    python benchmarks/cpu_quant.py --dim 256 --layers 2 --new-tokens 8 --reps 1   # smoke test
"""

from __future__ import annotations

import argparse
import copy
import time

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
from llamaherd.model.quant import Int8Linear, quantize

DEFAULTS = {"cpu": "float32,bfloat16,int8,int4,torchao-int8,torchao-int4",
            "cuda": "bfloat16,int8,int8-plain,int4,torchao-int8,torchao-int4"}
TARGET_CUDA_INT8 = 300.0  # tok/s, llama3-8b shape, batch 1: the project's goal for int8 decoding on a GPU


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds; a torchao tensor subclass holds its inner tensors."""
    if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names if getattr(t, n, None) is not None)
    if isinstance(t, torch.nn.Parameter) and type(t.data) is not torch.Tensor:
        return tensor_bytes(t.data)
    return t.numel() * t.element_size()


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer but the RoPE tables, a tied one once."""
    seen, total = set(), 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if name.startswith("rope_") or id(t) in seen:
            continue
        seen.add(id(t))
        total += tensor_bytes(t)
    return total


def torchao_model(model: torch.nn.Module, scheme: str, group_size: int, device: str) -> torch.nn.Module:
    """``model`` quantised by torchao, the same layers as ours (int8: every linear; int4: the block linears)."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    if scheme == "int8":
        cfg = Int8WeightOnlyConfig(set_inductor_config=False)
        keep = lambda m, fqn: isinstance(m, torch.nn.Linear)  # noqa: E731
    else:
        if device.startswith("cuda"):
            from torchao.quantization import Int4WeightOnlyConfig

            cfg = Int4WeightOnlyConfig(group_size=group_size, int4_packing_format="tile_packed_to_4d",
                                       set_inductor_config=False)
        else:
            from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig

            cfg = PrototypeInt4WeightOnlyConfig(group_size=group_size, set_inductor_config=False)
        keep = lambda m, fqn: isinstance(m, torch.nn.Linear) and fqn.startswith("layers.")  # noqa: E731
    quantize_(model, cfg, filter_fn=keep)
    return model


def build(name: str, base: torch.nn.Module, a) -> torch.nn.Module:
    """The contender ``name`` made from the float32 (CPU) or bfloat16 (CUDA) model ``base``."""
    bf16 = torch.bfloat16
    if name == "float32":
        return prepare_for_decoding(copy.deepcopy(base).float())
    if name == "bfloat16":  # on a GPU the base model is already this one: no copy of its 16 GB
        return base if base.tok_embeddings.weight.dtype == bf16 else copy.deepcopy(base).to(bf16)
    if name in ("int8", "int8-plain"):
        model = quantize(copy.deepcopy(base), "int8", dtype=bf16)
        if name == "int8-plain":
            for m in model.modules():
                if isinstance(m, Int8Linear):
                    m.kernel = False
        return model
    if name == "int4":
        return prepare_for_decoding(quantize(copy.deepcopy(base), "int4", a.group_size, dtype=bf16))
    if name in ("torchao-int8", "torchao-int4"):
        return torchao_model(copy.deepcopy(base).to(bf16), name[-4:], a.group_size, a.device)
    raise SystemExit(f"error: unknown contender {name!r} (expected float32, bfloat16, int8, int8-plain, int4, "
                     "torchao-int8, torchao-int4)")


@torch.inference_mode()
def top1_agreement(model, reference_tokens: list[int], prompt_len: int, device) -> float:
    """Fraction of the float model's greedy tokens that ``model`` also picks, teacher-forced."""
    seq = torch.tensor([reference_tokens], device=device)
    picks = model(seq)[0, prompt_len - 1 : -1].argmax(-1)
    return (picks == seq[0, prompt_len:]).float().mean().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu, or cuda (the llama3-8b shape unless --preset/--dim say)")
    p.add_argument("--preset", default=None, help="a model preset (default: llama3-8b on cuda, the --dim shape on cpu)")
    p.add_argument("--dim", type=int, default=1024, help="CPU shape: model width (heads of 64)")
    p.add_argument("--layers", type=int, default=8, help="CPU shape: layers")
    p.add_argument("--vocab-size", type=int, default=32768, help="CPU shape: vocabulary")
    p.add_argument("--contenders", default=None, help=f"comma-separated (cpu: {DEFAULTS['cpu']}; cuda: "
                                                      f"{DEFAULTS['cuda']})")
    p.add_argument("--group-size", type=int, default=128, help="int4: inputs per scale")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=None, help="new tokens per call (default: 64 cpu, 256 cuda)")
    p.add_argument("--reps", type=int, default=5, help="timed rounds (each runs every contender once)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--compile", action="store_true", help="generate(compile=True): CUDA graphs on a GPU, "
                                                          "AOTInductor on a CPU (compiled in the warm-up)")
    add_threads_argument(p)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    a = p.parse_args()
    require_device(a.device)
    set_threads(a.threads)
    cuda = a.device.startswith("cuda")
    n = a.new_tokens or (256 if cuda else 64)
    names = (a.contenders or DEFAULTS["cuda" if cuda else "cpu"]).split(",")

    info = machine()
    print_machine(info)
    if a.preset or cuda:
        args = preset(a.preset or "llama3-8b", max_seq_len=max(512, a.prompt_len + n))
    else:
        args = ModelArgs(dim=a.dim, n_layers=a.layers, n_heads=a.dim // 64, n_kv_heads=max(1, a.dim // 128),
                         vocab_size=a.vocab_size, multiple_of=256, max_seq_len=max(512, a.prompt_len + n))
    base_dtype = torch.bfloat16 if cuda else torch.float32
    base = build_ours(args, seed=0, dtype=base_dtype, device=a.device).eval()
    print(f"config: dim {args.dim}, {args.n_layers} layers, {args.n_heads}/{args.n_kv_heads} heads, ffn "
          f"{args.hidden_dim}, vocab {args.vocab_size}; batch 1, prompt {a.prompt_len}, {n} new tokens, greedy; "
          f"int4 group {a.group_size}; compile={a.compile}; device {a.device}")
    prompt = torch.randint(0, args.vocab_size, (a.prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
    reference = prompt + generate(base, [prompt], max_new_tokens=n)[0]

    models, contenders, memory, agree, warmup_s, kernels = {}, {}, {}, {}, {}, {}
    for name in names:
        try:
            model = build(name, base, a)
        except ImportError as e:
            print(f"skip {name}: {e}")
            continue
        models[name] = model
        memory[name] = weight_bytes(model)
        agree[name] = top1_agreement(model, reference, a.prompt_len, a.device)
        layer = model.layers[0].feed_forward.w1
        kernels[name] = getattr(layer, "layout", getattr(layer, "kernel", None))

        def run(model=model):
            return generate(model, [prompt], max_new_tokens=n, compile=a.compile)[0]

        t0 = time.perf_counter()
        try:
            out = run()
        except Exception as e:  # a peer configuration that does not run here is reported, not fatal
            print(f"skip {name}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
            del models[name]
            continue
        warmup_s[name] = time.perf_counter() - t0
        assert len(out) == n, f"{name} gave {len(out)} tokens, expected {n}"
        contenders[name] = run
        print(f"built {name}: weights {memory[name] / 2**20:.1f} MiB, top-1 agreement with the float model "
              f"{agree[name]:.3f}, first call {warmup_s[name]:.1f}s" + (f", kernel {kernels[name]}"
                                                                      if kernels[name] is not None else ""))
    del base

    times = interleaved(contenders, reps=a.reps, warmup=a.warmup)
    ref = "float32" if "float32" in times else next(iter(times))
    result = {"benchmark": "cpu_quant", "machine": info, "config": {**vars(a), "new_tokens": n,
                                                                    "model_args": args.to_dict()},
              "results": {}}
    rows = []
    for name, ts in times.items():
        s = stats(ts)
        tps = [n / t for t in ts]
        r = paired_ratio(times[ref], ts)
        rows.append([name, f"{n / s['median']:.1f}", f"{min(tps):.1f}-{max(tps):.1f}",
                     f"{r['median']:.2f}x ({r['min']:.2f}-{r['max']:.2f})", f"{memory[name] / 2**20:.1f}",
                     f"{memory[ref] / memory[name]:.2f}x", f"{agree[name]:.3f}"])
        result["results"][name] = {"seconds": ts, "tok_per_s_median": n / s["median"], "speedup_vs_" + ref: r,
                                   "weight_bytes": memory[name], "top1_agreement": agree[name],
                                   "first_call_s": warmup_s[name], "kernel": kernels[name]}
    print()
    print(fmt_table(["", "tok/s (median)", "tok/s (min-max)", f"speed vs {ref} (paired)", "weights MiB",
                     f"smaller than {ref}", "top-1 vs float"], rows))
    for ours, peer in (("int8", "torchao-int8"), ("int4", "torchao-int4")):
        if ours in times and peer in times:
            r = paired_ratio(times[peer], times[ours])
            print(f"ratio {ours} / {peer}: {r['median']:.2f}x (min {r['min']:.2f}, max {r['max']:.2f}, "
                  f"{a.reps} paired rounds)")
    if cuda and args.dim == 4096 and "int8" in times:
        tps = result["results"]["int8"]["tok_per_s_median"]
        print(f"int8, llama3-8b shape, batch 1: {tps:.1f} tok/s; target >= {TARGET_CUDA_INT8:.0f}: "
              f"{'met' if tps >= TARGET_CUDA_INT8 else 'NOT met'}")
    write_json(a.out, result)


if __name__ == "__main__":
    main()
