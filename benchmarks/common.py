"""Helpers the benchmark scripts share: timing, the machine description, a Hugging Face twin of our model.

Timing: every contender is warmed up, then the contenders run in turn, repetition after repetition
(A B C A B C ...), so that a slow patch of a shared machine hits them all alike. We report the
median of each and, for a ratio, the median of the per-repetition ratios with their min-max spread.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python benchmarks/x.py` from a checkout without installing
    sys.path.insert(0, str(ROOT))

from llamaherd.model import ModelArgs, Transformer  # noqa: E402

# --- machine description ---------------------------------------------------------------------------

def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                wanted = ["avx2", "avx512f", "avx512_bf16", "amx_bf16"]
                return ",".join(f for f in wanted if f in flags) or "none of avx2/avx512"
    except OSError:
        pass
    return "unknown"


def git_commit() -> str:
    """Short commit of the checkout, with '+dirty' when tracked files under llamaherd/ are modified."""
    def git(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=10)
    try:
        head = git("rev-parse", "--short", "HEAD").stdout.strip() or "unknown"
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", "llamaherd").stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine() -> dict:
    """What the numbers were measured on: hardware, software versions, commit and date."""
    try:
        import transformers
        tf_version = transformers.__version__
    except ImportError:
        tf_version = None
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(),
        "cpu": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": tf_version,
        "gpu": None,
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = f"{p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs"
        info["cuda"] = torch.version.cuda
    return info


def print_machine(info: dict) -> None:
    print("machine:", ", ".join(f"{k}={v}" for k, v in info.items() if v is not None))


# --- timing --------------------------------------------------------------------------------------

def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def add_threads_argument(p) -> None:
    """--threads for a CPU benchmark: the same torch thread count for every contender."""
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads, the same for every contender (0: torch's default)")


def set_threads(threads: int) -> None:
    if threads > 0:
        torch.set_num_threads(threads)


def require_device(device: str) -> None:
    """Exit with a one-line error when a CUDA device is asked for and there is none."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("error: no CUDA device (this script is for a GPU; --device cpu runs a smoke test)")


def timed(fn: Callable[[], object]) -> float:
    """Seconds taken by one call of ``fn`` (GPU work included)."""
    _sync()
    t0 = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - t0


def interleaved(contenders: dict[str, Callable[[], object]], reps: int, warmup: int = 1,
                verbose: bool = True) -> dict[str, list[float]]:
    """Seconds per call for every contender: ``warmup`` untimed calls each, then ``reps`` rounds.

    Each round calls every contender once; the order alternates between rounds (A B C, C B A, ...)
    so that neither side always runs first.
    """
    names = list(contenders)
    for name in names:
        for _ in range(warmup):
            contenders[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        for name in (names if r % 2 == 0 else names[::-1]):
            times[name].append(timed(contenders[name]))
        if verbose:
            print(f"  rep {r + 1}/{reps}: " + "  ".join(f"{n} {times[n][-1]:.3f}s" for n in names), flush=True)
    return times


def stats(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def paired_ratio(num: list[float], den: list[float]) -> dict:
    """Median and spread of num[i] / den[i]: rounds are paired, so both sides saw the same noise."""
    return stats([a / b for a, b in zip(num, den)])


def fmt_table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(c) for c in r] for r in [headers, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    def line(r):
        return "| " + " | ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep, *(line(r) for r in cells[1:])])


def write_json(path: str | os.PathLike | None, result: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {path}")


# --- our model and its Hugging Face twin ---------------------------------------------------------

def build_ours(args: ModelArgs, *, seed: int = 0, std: float = 0.02, dtype=torch.float32, device="cpu") -> Transformer:
    """A Transformer with seeded random weights, built directly on ``device`` in ``dtype``."""
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Transformer(args)
    finally:
        torch.set_default_dtype(old)
    model.init_weights(std=std, seed=seed)
    model.init_rope(device=device)  # float32 RoPE tables, whatever the default dtype was
    return model


def _hf_names_and_rope():
    """(Meta name -> HF name, rows permutation) from the checkpoint module, else a local copy."""
    try:
        from llamaherd.checkpoint.hf import file_name, to_hf_rope
        return file_name, to_hf_rope
    except ImportError:
        top = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
               "output.weight": "lm_head.weight"}
        layer = {"attention.wq.weight": "self_attn.q_proj.weight", "attention.wk.weight": "self_attn.k_proj.weight",
                 "attention.wv.weight": "self_attn.v_proj.weight", "attention.wo.weight": "self_attn.o_proj.weight",
                 "feed_forward.w1.weight": "mlp.gate_proj.weight", "feed_forward.w2.weight": "mlp.down_proj.weight",
                 "feed_forward.w3.weight": "mlp.up_proj.weight", "attention_norm.weight": "input_layernorm.weight",
                 "ffn_norm.weight": "post_attention_layernorm.weight"}

        def file_name(name):
            if name in top:
                return top[name]
            _, i, rest = name.split(".", 2)
            return f"model.layers.{i}.{layer[rest]}"

        def to_hf_rope(w, n_heads):
            rows, dim = w.shape
            return w.view(n_heads, rows // n_heads // 2, 2, dim).transpose(1, 2).reshape(rows, dim)

        return file_name, to_hf_rope


def hf_config(args: ModelArgs, dtype=torch.float32):
    from transformers import LlamaConfig

    rope_scaling = None
    if args.use_scaled_rope:
        rope_scaling = {"rope_type": "llama3", "factor": args.rope_scaling_factor,
                        "low_freq_factor": args.rope_low_freq_factor, "high_freq_factor": args.rope_high_freq_factor,
                        "original_max_position_embeddings": args.rope_original_context}
    return LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.hidden_dim,
        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads,
        head_dim=args.head_dim, max_position_embeddings=args.max_seq_len, rms_norm_eps=args.norm_eps,
        rope_theta=args.rope_theta, rope_scaling=rope_scaling, tie_word_embeddings=args.tie_embeddings,
        attention_bias=False, mlp_bias=False, hidden_act="silu", bos_token_id=None, eos_token_id=None,
        pad_token_id=None, torch_dtype=dtype,
    )


def hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Our weights under Hugging Face names, wq/wk rows permuted to HF's half-split RoPE layout."""
    file_name, to_hf_rope = _hf_names_and_rope()
    args = model.args
    out = {}
    for name, t in model.state_dict().items():
        if args.tie_embeddings and name == "output.weight":
            continue  # tied: lm_head shares embed_tokens
        if name.endswith("attention.wq.weight"):
            t = to_hf_rope(t, args.n_heads)
        elif name.endswith("attention.wk.weight"):
            t = to_hf_rope(t, args.n_kv_heads)
        out[file_name(name)] = t
    return out


def build_hf(model: Transformer, *, attn_implementation: str = "sdpa"):
    """transformers.LlamaForCausalLM with the same config and the same weights as ``model``."""
    from transformers import LlamaForCausalLM

    w = model.tok_embeddings.weight
    config = hf_config(model.args, w.dtype)
    config._attn_implementation = attn_implementation
    old = torch.get_default_dtype()
    torch.set_default_dtype(w.dtype)
    try:
        with torch.device(w.device):
            hf = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(old)
    missing, unexpected = hf.load_state_dict(hf_state_dict(model), strict=False)
    missing = [m for m in missing if not (model.args.tie_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"weight conversion: missing {missing}, unexpected {unexpected}")
    if model.args.tie_embeddings:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr(), "lm_head is not tied"
    return hf.eval()


@torch.no_grad()
def assert_same_logits(ours: Transformer, hf, tokens: torch.Tensor, rtol: float = 1e-5,
                       atol_scale: float = 1e-5) -> float:
    """Both models give the same logits for ``tokens`` (tolerance relative to max |logit|); returns max |diff|."""
    a = ours(tokens).float()
    b = hf(input_ids=tokens, use_cache=False).logits.float()
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol_scale * b.abs().max().item())
    return (a - b).abs().max().item()
