"""`herd plan`: the layouts of a training run before it exists — memory per GPU, step time and MFU, ranked.

    herd plan --model llama3.1-405b --gpus 16384 --gpu h100-80gb --seq 8192 --global-batch-tokens 16M

Every candidate (tp, pp, dp, micro-batch size, pipeline schedule, activation checkpointing) is costed with a
closed-form model; the ones whose memory fits are ranked by predicted step time. Every number the model
uses is in ``HARDWARE`` or ``ASSUMPTIONS`` and printed with the plan (docs/distributed.md explains each).

Memory per GPU, on the pipeline's first rank (it holds the most activations):
    model states   16 bytes per parameter, sharded over dp (fp32 master weights, Adam's two moments, the
                   fp32 gradient shard); plus, with pipeline stages, the stage's whole bf16 parameters and
                   gradients (gathered once a step, kept across micro-batches); without, two layers' worth
                   (gathered block by block, FSDP's reshard after forward)
    activations    2 bytes x (6 dim + 2 kv_dim + 3 ffn_dim) per token per layer, split by tp (sequence
                   parallel included) — the layers' inputs, the norms' outputs, q/k/v, the attention output,
                   the SwiGLU's three ffn_dim-wide tensors; flash attention stores no score matrix. Full
                   activation checkpointing keeps only each layer's input (2 x dim) and one layer in full;
                   the "op" policy (``train.ac_policy``) keeps each layer's input and the outputs of its
                   matmuls and attention (``op_saved``) and one layer in full; every N-th layer checkpointed
                   ("N") keeps those layers' inputs, the others in full, and one layer in full.
                   In flight on the first rank: every micro-batch (GPipe), min(pp, m) (1F1B), that times
                   1 + (pp - 1) / (pp v) (interleaved 1F1B with v stages per rank)
    + the output logits in float32 where the loss is, + a fixed reserve (CUDA context, NCCL buffers)

Time per step: the model FLOPs at ``matmul_efficiency`` of peak (full checkpointing adds a forward pass:
+ 2N of the 6N per token), the pipeline bubble ((pp - 1) / (v m) of it), tensor-parallel collectives
(4 per layer per micro-batch forward, 4 backward, over NVLink within a node, not overlapped), pipeline
sends between stages (over the network), and the data-parallel all-gathers and reduce-scatters (over the
network, ``dp_overlap`` of them hidden behind compute). Layers are split over stages as Meta did for
405B: the first and last stages one layer fewer, when that evens them out.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from llamaherd.errors import HerdError

GIB = 2**30

# per GPU: dense bf16 peak FLOP/s, memory, in-node (NVLink) and network bandwidth in bytes/s one way
HARDWARE = {
    "h100-80gb": dict(peak_flops=989e12, memory_gib=80.0, nvlink_bw=450e9, network_bw=50e9, gpus_per_node=8),
    "h200": dict(peak_flops=989e12, memory_gib=141e9 / GIB, nvlink_bw=450e9, network_bw=50e9, gpus_per_node=8),
    "a100-80gb": dict(peak_flops=312e12, memory_gib=80.0, nvlink_bw=300e9, network_bw=25e9, gpus_per_node=8),
    "a100-40gb": dict(peak_flops=312e12, memory_gib=40.0, nvlink_bw=300e9, network_bw=25e9, gpus_per_node=8),
}
LATENCY = {"nvlink": 3e-6, "network": 10e-6}  # seconds per step of a ring collective (one hop)

# what autograd keeps per token per layer, in elements (then x bytes per element, / tp): eager PyTorch keeps the
# norms' inputs and outputs, q, k, v, the attention output, and the SwiGLU's w1 and w3 outputs and product;
# compiled blocks (torch.compile, ``train.compile``; fused kernels) recompute the norm outputs and the product
KERNELS = {"compiled": lambda h, kv, f: 4 * h + 2 * kv + 2 * f, "eager": lambda h, kv, f: 6 * h + 2 * kv + 3 * f}


def op_saved(h: int, kv: int, f: int) -> int:
    """What the "op" selective checkpointing policy keeps per token per layer, in elements: the layer's input
    (h, the checkpoint's) and what the matmuls and attention return: q (h), k and v (kv each), the attention
    output (h), wo's output (h), w1's and w3's (f each) and w2's (h). Less than eager blocks keep without
    checkpointing, more than compiled ones (``KERNELS``: inductor already recomputes the cheap operations)."""
    return 5 * h + 2 * kv + 2 * f


ASSUMPTIONS = {
    "matmul_efficiency": 0.6,  # share of peak the model's FLOPs run at (large bf16 GEMMs, attention, the rest)
    "bandwidth_efficiency": 0.8,  # share of the link bandwidth a collective achieves
    "dp_overlap": 0.9,  # share of the data-parallel collectives hidden behind compute
    "tp_overlap": 0.0,  # share of the tensor-parallel collectives hidden behind compute
    "reserve_gib": 4.0,  # memory kept for the CUDA context, NCCL buffers and fragmentation
    "optimizer_bytes": 16,  # per parameter, sharded over dp: fp32 master, Adam m and v, fp32 gradient shard
}


@dataclass
class Candidate:
    tp: int
    pp: int
    dp: int
    microbatch: int  # sequences per micro-batch
    microbatches: int  # per step, per data-parallel rank
    schedule: str  # "1F1B", "Interleaved1F1B", "GPipe", or "-" without pipeline
    activation_checkpointing: bool
    stages_per_rank: int = 1  # v: the interleaved schedule's model chunks per rank
    memory_gib: float = 0.0
    memory: dict | None = None  # its parts, GiB
    step_s: float = 0.0
    time: dict | None = None  # its parts, seconds
    bubble: float = 0.0  # the pipeline's idle share of the compute
    comm_gib: float = 0.0  # bytes each GPU sends per step, GiB
    mfu: float = 0.0
    tflops_per_gpu: float = 0.0
    fits: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


def parse_tokens(text: str | int) -> int:
    """``16M`` -> 16 * 2**20 tokens (K, M, G as powers of two, as batch sizes are), or a plain number."""
    if isinstance(text, int):
        return text
    s = str(text).strip().upper().replace("_", "")
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "B": 2**30}
    try:
        if s and s[-1] in units:
            return int(float(s[:-1]) * units[s[-1]])
        return int(s)
    except ValueError:
        raise HerdError(f"{text!r}: expected a token count such as 4M, 16M or 4194304") from None


def stage_layers(n_layers: int, pp: int) -> list[int]:
    """Layers per pipeline stage: even, but the first and last stages one fewer when that evens them out
    (they also hold the embedding and the output; Meta's split of 405B's 126 layers: 7, 8 x 14, 7)."""
    if pp == 1:
        return [n_layers]
    if pp > 2 and (n_layers + 2) % pp == 0:
        k = (n_layers + 2) // pp
        return [k - 1] + [k] * (pp - 2) + [k - 1]
    base, extra = divmod(n_layers, pp)
    return [base + (i < extra) for i in range(pp)]


def _divisors_pow2(n: int, limit: int) -> list[int]:
    out, k = [], 1
    while k <= limit:
        if n % k == 0:
            out.append(k)
        k *= 2
    return out


def cost(c: Candidate, args, hw: dict, seq: int, global_tokens: int, flops_tok: float, a: dict = ASSUMPTIONS,
         kernels: str = "compiled", precision: str = "bf16", loss_chunk: int = 0, param_dtype: str = "float32",
         ac_policy: str = "full"):
    """Fill in ``c``'s memory, time and MFU. ``precision`` "bf16": bf16 compute with float32 master weights
    (FSDP's mixed precision); "fp32": everything float32, as on a CPU. ``kernels``: see ``KERNELS``.
    ``loss_chunk`` (``train.loss_chunk``): the logits held are a chunk's, not the micro-batch's;
    ``param_dtype`` "bfloat16" (``train.param_dtype``): weights, gradients and AdamW states in bf16;
    ``ac_policy`` (``train.ac_policy``, with ``c.activation_checkpointing``): "full", "op" or "N" (every N-th
    layer): what the checkpointed layers keep, and the recomputation they cost."""
    h, f, V = args.dim, args.hidden_dim, args.vocab_size
    kv = args.n_kv_heads * args.head_dim
    layer_params = 2 * h * h + 2 * h * kv + 3 * h * f + 2 * h  # wq, wo, wk, wv, SwiGLU, two norms
    v = c.stages_per_rank
    layers = stage_layers(args.n_layers, c.pp)
    first = math.ceil(args.n_layers / (c.pp * v)) * v if v > 1 else layers[0]
    stage_params = (first * layer_params + V * h * (1 if c.pp > 1 else 2)) / c.tp  # + embedding (+ output)
    m, mbs = c.microbatches, c.microbatch
    tokens_mb = mbs * seq
    # memory, bytes
    lean = param_dtype in ("bfloat16", "bf16")  # bf16 weights: bf16 activations too, whatever the autocast
    element = 2 if precision == "bf16" or lean else 4
    states = (8 if lean else a["optimizer_bytes"]) * stage_params / c.dp  # bf16: 2 + 2 + 2 x 2 bytes
    if lean or (element == 4 and c.dp == 1):
        working = 0.0  # float32 alone: the parameters and gradients are the states'
    elif c.pp > 1:
        working = 4 * stage_params  # bf16 parameters and gradients of the whole stage, kept over the micro-batches
    else:
        working = 4 * 2 * layer_params / c.tp  # two blocks gathered at a time
    per_token_layer = element * KERNELS[kernels](h, kv, f) / c.tp
    if c.pp == 1:
        in_flight = 1.0
    elif c.schedule == "GPipe":
        in_flight = m
    else:
        in_flight = min(c.pp, m) * (1 + (c.pp - 1) / (c.pp * v) if v > 1 else 1)
    # the share of the stage's layers recomputed whole in the backward (the "op" policy recomputes no matmul)
    recomputed = 0.0
    if not c.activation_checkpointing:
        acts = in_flight * first * tokens_mb * per_token_layer
    elif ac_policy == "op":
        acts = in_flight * first * tokens_mb * element * op_saved(h, kv, f) / c.tp + tokens_mb * per_token_layer
    else:
        every = 1 if ac_policy == "full" else int(ac_policy)
        checkpointed = first // every  # layers every-1, 2 every-1, ... of the stage
        recomputed = checkpointed / first
        kept = checkpointed * element * h / c.tp + (first - checkpointed) * per_token_layer
        acts = in_flight * tokens_mb * kept + (tokens_mb * per_token_layer if checkpointed else 0)
    if kernels == "eager":  # a dense document mask per layer (FlexAttention's block mask on GPUs is small)
        acts += in_flight * first * mbs * seq * seq * 4
    if c.pp > 1:
        logits = 0
    elif loss_chunk:  # one chunk's logits (in the compute dtype and float32) and their gradient, a float a token
        logits = min(tokens_mb, loss_chunk) * V / c.tp * (element + 8) + tokens_mb * 4
    else:
        logits = tokens_mb * V / c.tp * 4 * 2  # float32 logits and their gradient
    memory = {"model_states": states / GIB, "working_weights": working / GIB, "activations": acts / GIB,
              "logits": logits / GIB, "reserve": a["reserve_gib"]}
    c.memory = {k: round(val, 2) for k, val in memory.items()}
    c.memory_gib = round(sum(memory.values()), 2)
    c.fits = c.memory_gib <= hw["memory_gib"]
    # time, seconds
    gpus = c.tp * c.pp * c.dp
    ideal = global_tokens * flops_tok / (gpus * hw["peak_flops"])
    n_matmul_share = 1 - 12 * args.n_layers * h * seq / flops_tok
    compute = ideal / a["matmul_efficiency"] * (1 + n_matmul_share / 3 * recomputed)
    c.bubble = (c.pp - 1) / (v * m) if c.pp > 1 else 0.0
    bubble = compute * c.bubble
    nvlink = hw["nvlink_bw"] * a["bandwidth_efficiency"]
    network = hw["network_bw"] * a["bandwidth_efficiency"]
    layers_here = args.n_layers / c.pp
    act_bytes = tokens_mb * h * 2
    # a recomputed forward repeats its collectives ("op" keeps no collective's output: it repeats them all)
    n_coll = 8 + 4 * (1 if c.activation_checkpointing and ac_policy == "op" else recomputed)
    tp_bytes = layers_here * m * n_coll * act_bytes * (c.tp - 1) / c.tp if c.tp > 1 else 0.0
    in_node = c.tp <= hw["gpus_per_node"]
    tp_link, tp_hop = (nvlink, LATENCY["nvlink"]) if in_node else (network, LATENCY["network"])
    tp_count = layers_here * m * n_coll if c.tp > 1 else 0
    tp_time = (tp_bytes / tp_link + tp_count * (c.tp - 1) * tp_hop) * (1 - a["tp_overlap"])
    pp_bytes = 2 * m * v * act_bytes / c.tp if c.pp > 1 else 0.0
    pp_time = pp_bytes / network + (2 * m * v * LATENCY["network"] if c.pp > 1 else 0.0)
    # FSDP, a unit per block: with stages, each gathered once a step and its gradient reduce-scattered once;
    # without, gathered for the forward and again for the backward (reshard after forward)
    dp_factor, dp_count = (6, 2) if c.pp > 1 else (8, 3)  # bytes per parameter (bf16 gathers, fp32 scatter)
    dp_bytes = dp_factor * (args.n_layers * layer_params + 2 * V * h) / (c.tp * c.pp) * (c.dp - 1) / c.dp
    dp_link, dp_hop = (network, LATENCY["network"]) if c.tp * c.pp < gpus else (nvlink, LATENCY["nvlink"])
    dp_hops = dp_count * layers_here * (c.dp - 1) * dp_hop if c.dp > 1 else 0.0  # ring steps: latency bound at scale
    dp_time = dp_bytes / dp_link * (1 - a["dp_overlap"]) + dp_hops
    c.time = {k: round(val, 4) for k, val in {"compute": compute, "bubble": bubble, "tensor_parallel": tp_time,
                                               "pipeline": pp_time, "data_parallel": dp_time}.items()}
    c.step_s = round(compute + bubble + tp_time + pp_time + dp_time, 4)
    c.comm_gib = round((tp_bytes + pp_bytes + dp_bytes) / GIB, 2)
    c.mfu = round(ideal / c.step_s, 4)
    c.tflops_per_gpu = round(c.mfu * hw["peak_flops"] / 1e12, 1)
    return c


def plan(model: str, gpus: int, gpu: str, seq: int, global_batch_tokens: int | str, *, top: int = 10,
         only_fitting: bool = True, all_variants: bool = False, assumptions: dict | None = None,
         kernels: str = "compiled", loss_chunk: int = 0, param_dtype: str = "float32") -> list[Candidate]:
    """The candidate layouts of a run, costed and ranked by predicted step time (those that fit first).
    ``loss_chunk`` (``train.loss_chunk``) applies to the layouts without tensor or pipeline parallelism, as in
    training (there loss parallel and the last stage hold the logits instead); ``param_dtype`` "bfloat16"
    (``train.param_dtype``) to one GPU only, as in training."""
    from llamaherd.model.args import PRESETS, flops_per_token, preset

    if gpu not in HARDWARE:
        raise HerdError(f"--gpu {gpu!r}: expected one of {', '.join(HARDWARE)}")
    if model not in PRESETS:
        raise HerdError(f"--model {model!r}: expected one of {', '.join(PRESETS)}")
    if gpus < 1 or seq < 1:
        raise HerdError("--gpus and --seq must be at least 1")
    if kernels not in KERNELS:
        raise HerdError(f"--kernels {kernels!r}: expected one of {', '.join(KERNELS)}")
    if loss_chunk < 0:
        raise HerdError(f"--loss-chunk {loss_chunk}: expected 0 (the plain loss) or tokens per chunk >= 1")
    if param_dtype not in ("float32", "bfloat16"):
        raise HerdError(f"--param-dtype {param_dtype!r}: expected float32 or bfloat16")
    if param_dtype == "bfloat16" and gpus > 1:
        raise HerdError(f"--param-dtype bfloat16 with --gpus {gpus}: bf16 states train in one process; expected "
                        "--gpus 1 (FSDP keeps float32 master weights)")
    args = preset(model)
    hw = HARDWARE[gpu]
    a = {**ASSUMPTIONS, **(assumptions or {})}
    tokens = parse_tokens(global_batch_tokens)
    if tokens % seq:
        raise HerdError(f"--global-batch-tokens {tokens:,} is not a whole number of {seq:,}-token sequences")
    sequences = tokens // seq
    flops_tok = flops_per_token(args, seq)
    out = []
    for tp in _divisors_pow2(math.gcd(args.n_kv_heads, args.n_heads), hw["gpus_per_node"]):
        for pp in range(1, args.n_layers + 1):
            if gpus % (tp * pp) or (pp > 1 and pp & (pp - 1)):
                continue
            dp = gpus // (tp * pp)
            if sequences % dp:
                continue
            per_rank = sequences // dp
            for mbs in (1, 2, 4, 8):
                if per_rank % mbs:
                    continue
                m = per_rank // mbs
                schedules = [("-", 1)] if pp == 1 else [("1F1B", 1), ("GPipe", 1)] + [
                    ("Interleaved1F1B", v) for v in (2, 4, 8) if args.n_layers >= v * pp and m % pp == 0]
                for schedule, v in schedules:
                    for ac in (False, True):
                        c = cost(Candidate(tp, pp, dp, mbs, m, schedule, ac, v), args, hw, seq, tokens, flops_tok, a,
                                 kernels, loss_chunk=loss_chunk if tp == pp == 1 else 0, param_dtype=param_dtype)
                        if c.fits or not only_fitting:
                            out.append(c)
    out.sort(key=lambda c: (not c.fits, c.step_s, c.memory_gib))
    if not all_variants:  # the best micro-batching, schedule and checkpointing of each (tp, pp, dp)
        best: dict = {}
        for c in out:
            best.setdefault((c.tp, c.pp, c.dp), c)
        out = list(best.values())
    return out[:top] if top else out


def run_memory(cfg, args, precision: str = "fp32") -> dict:
    """The memory model's prediction for one process training ``cfg`` with eager PyTorch, in float32 (on the
    CPU; what ``benchmarks/cpu_plan_memory.py`` compares with the measured peak) or with bf16 activations
    (``precision="bf16"``, on a GPU: ``benchmarks/gpu_fsdp.py``). GiB, by part and in all."""
    from llamaherd.model.args import flops_per_token

    t = cfg.train
    c = Candidate(1, 1, 1, t.batch_size, t.grad_accum, "-", t.activation_checkpointing)
    hw = {"peak_flops": 1e12, "memory_gib": float("inf"), "nvlink_bw": 1e9, "network_bw": 1e9, "gpus_per_node": 1}
    cost(c, args, hw, t.seq_len, t.batch_size * t.seq_len * t.grad_accum, flops_per_token(args, t.seq_len),
         {**ASSUMPTIONS, "reserve_gib": 0.0}, kernels="eager", precision=precision, loss_chunk=t.loss_chunk,
         param_dtype=t.param_dtype, ac_policy=t.ac_policy)
    return {**c.memory, "total": c.memory_gib}
