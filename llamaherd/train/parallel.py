"""How a model is built for training, and everything the model itself does not know, applied from outside.

    model = build_model(args, cfg, device, dist)   # meta device -> parallelize -> materialise -> fresh weights

``parallelize`` applies, in this order: float8 linears -> tensor parallel -> activation checkpointing ->
compile -> FSDP, on the model while it is still on the meta device and holds no memory, as torchtitan does
(model converters such as float8 first, then the parallelisms), so a model too large for one device is
sharded before any weight exists. ``dist`` (``train.distributed``) says
which ranks do what: ``dist.tp_mesh`` for tensor parallelism, ``dist.dp_mesh`` for FSDP (HSDP with
replicas). Pipeline stages are cut in ``train.pipeline``.

Tensor parallel (Megatron-style, with sequence parallelism, as torchtitan lays out Llama):

    tok_embeddings   rows of the vocabulary per rank; out: the sequence split over ranks
    attention_norm, ffn_norm, norm    on each rank's part of the sequence
    wq, wk, wv, w1, w3    column-wise: each rank computes its heads / its share of the hidden units
    wo, w2                row-wise: partial sums reduce-scattered back onto the split sequence
    output                column-wise over the vocabulary; with loss parallel the logits stay split and
                          the cross-entropy runs on the shards (``Distributed.loss_context``)
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint

from llamaherd.config import RunConfig
from llamaherd.errors import HerdError
from llamaherd.model.args import ModelArgs
from llamaherd.model.transformer import Transformer


def _blocks(model) -> list:
    """The transformer blocks of a model or of a pipeline stage (whose layers keep the model's numbers)."""
    return list(model.layers.values() if isinstance(model.layers, torch.nn.ModuleDict) else model.layers)


def apply_float8(model) -> None:
    """Float8 training of the blocks' linear layers (wq, wk, wv, wo, w1, w2, w3) through torchao, with dynamic
    tensorwise scaling (torchtitan's float8 converter): each matmul's inputs are cast to float8 e4m3 (the
    gradients to e5m2) with one scale per tensor from its current absolute maximum, the weights stay in their
    dtype. Only linears whose in and out features are both multiples of 16 are converted (``torch._scaled_mm``
    needs it); the output head and the embedding never are. ``Float8Linear`` is an ``nn.Linear`` that keeps the
    same ``weight`` parameter, so parameter names, the state dict and checkpoints are unchanged."""
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError:
        raise HerdError("train.float8=true needs torchao (pip install torchao)") from None

    def fits(module, fqn: str) -> bool:
        return isinstance(module, torch.nn.Linear) and module.in_features % 16 == 0 and module.out_features % 16 == 0

    config = Float8LinearConfig()  # dynamic scaling, tensorwise, e4m3 forward / e5m2 gradients: torchao's default
    for block in _blocks(model):
        convert_to_float8_training(block, module_filter_fn=fits, config=config)


def check_float8(cfg: RunConfig) -> None:
    """A one-line error unless ``train.float8`` can run: torchao importable, no tensor parallel."""
    if not cfg.train.float8:
        return
    if cfg.parallel.tp > 1:
        raise HerdError(f"train.float8=true with parallel.tp {cfg.parallel.tp}: float8 tensor parallel is not wired; "
                        "expected parallel.tp=1")
    try:
        import torchao.float8  # noqa: F401
    except ImportError:
        raise HerdError("train.float8=true needs torchao (pip install torchao)") from None


def ac_policy(name: str) -> str | int:
    """``train.ac_policy``: "full", "op", or every N-th block as the int N."""
    if name in ("full", "op"):
        return name
    if isinstance(name, str) and name.isascii() and name.isdigit() and int(name) > 0:
        return int(name)
    raise HerdError(f"train.ac_policy {name!r}: expected full, op or a positive integer (every N-th block)")


def _saved_ops() -> set:
    """The operations whose outputs the "op" policy saves: the matmuls and attention (the FLOPs of a block)."""
    aten = torch.ops.aten
    names = ["mm", "addmm", "bmm", "_scaled_mm", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
             "_scaled_dot_product_flash_attention_for_cpu"]
    ops = {getattr(aten, name).default for name in names if hasattr(aten, name)}
    try:
        from torch._higher_order_ops import flex_attention  # FlexAttention's operator (packed documents)

        ops.add(flex_attention)
    except ImportError:
        pass
    return ops


def _save_matmuls_context():
    """Per-operation selective checkpointing (torchtitan's "op" policy, simplified): what a matmul or an
    attention kernel returns is kept; everything else in the block is recomputed in the backward."""
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    saved = _saved_ops()

    def policy(ctx, func, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if func in saved else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def apply_activation_checkpointing(model, policy: str = "full") -> None:
    """Recompute transformer blocks' activations in the backward pass instead of storing them.

    ``policy`` (``train.ac_policy``):
      "full"  each block recomputed whole: only its input is kept.
      "op"    per-operation selective checkpointing: each block keeps its input and the outputs of its matmuls
              (aten.mm, addmm, bmm, _scaled_mm: wq, wk, wv, wo, w1, w3, w2) and of its attention kernel
              (aten._scaled_dot_product_*_attention, FlexAttention: the output and its log-sum-exp);
              the norms, RoPE, SiLU, the products, the casts and the reshapes are recomputed.
      "N"     every N-th block (layers N-1, 2N-1, ...) fully checkpointed, the others not checkpointed.
    The blocks' forward methods are wrapped in place, so parameter names (and checkpoints) are unchanged.
    """
    policy = ac_policy(policy)
    for block in _blocks(model):
        if policy == "op":
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False,
                                              context_fn=_save_matmuls_context)
        elif policy == "full" or (block.layer_id + 1) % policy == 0:
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def apply_compile(model) -> None:
    """Compile each block separately: the blocks are identical, so one compiled graph serves them all."""
    for block in _blocks(model):
        block.compile()


def apply_tp(model: Transformer, tp_mesh, loss_parallel: bool = True) -> None:
    """Tensor (and sequence) parallelism over ``tp_mesh``, in place; a tied output keeps its embedding."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    top = {"tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
           "norm": SequenceParallel(),
           "output": ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1) if loss_parallel else Replicate(),
                                     use_local_output=not loss_parallel)}
    # a pipeline stage has only some of them
    parallelize_module(model, tp_mesh, {name: plan for name, plan in top.items() if getattr(model, name) is not None})
    # a block's attention is called with (x, cos, sin, positions, mask, cache): only x is split
    rest = (None,) * 5
    for block in _blocks(model):
        parallelize_module(block, tp_mesh, {
            "attention_norm": SequenceParallel(),
            "attention": PrepareModuleInput(input_layouts=(Shard(1), *rest),
                                            desired_input_layouts=(Replicate(), *rest)),
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
            "ffn_norm": SequenceParallel(),
            "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w3": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
        })
    if model.args.tie_embeddings:  # both are split by vocabulary rows: one parameter again
        model.output.weight = model.tok_embeddings.weight


def apply_fsdp(model: torch.nn.Module, dp_mesh, param_dtype: torch.dtype | None = None,
               reduce_dtype: torch.dtype | None = torch.float32) -> None:
    """FSDP2: each block its own unit (gathered just before it runs, freed after), the rest at the root.
    ``param_dtype`` bf16 computes in bf16 with float32 master weights and float32 gradient reduction."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    blocks = _blocks(model)
    for i, block in enumerate(blocks):
        # the last block is gathered again by the backward at once: keep it
        fully_shard(block, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp)


def parallelize(model: Transformer, cfg: RunConfig, dist=None) -> Transformer:
    """Apply to ``model``, in place, what ``cfg`` and the layout of ``dist`` ask for: float8 linears
    (``train.float8``), tensor parallel, activation checkpointing (``train.activation_checkpointing`` with
    ``train.ac_policy``), compile (``train.compile``), FSDP; returns it."""
    ac_policy(cfg.train.ac_policy)  # a bad value fails even where checkpointing is off
    if cfg.train.float8:
        check_float8(cfg)
        apply_float8(model)
    if dist is not None and dist.tp_mesh is not None:
        apply_tp(model, dist.tp_mesh, cfg.parallel.loss_parallel)
    if cfg.train.activation_checkpointing:
        apply_activation_checkpointing(model, cfg.train.ac_policy)
    if cfg.train.compile:
        apply_compile(model)
    if dist is not None and dist.dp_mesh is not None:
        from llamaherd.train.distributed import autocast_dtype

        apply_fsdp(model, dist.dp_mesh, param_dtype=autocast_dtype(cfg.train.dtype, dist.device))
    return model


def fresh_weights(args: ModelArgs, seed: int) -> dict[str, torch.Tensor]:
    """The weights ``init_weights(seed)`` gives a whole model on the CPU: what every layout starts from,
    so that a run trains the same model at any world size."""
    with torch.device("cpu"):
        model = Transformer(args)
    model.init_weights(seed=seed)
    return model.state_dict()


def is_distributed(model: torch.nn.Module) -> bool:
    """Whether some parameter of ``model`` is a DTensor (sharded or replicated over a mesh)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def build_model(args: ModelArgs, cfg: RunConfig, device: torch.device, dist=None):
    """A model to train: built on the meta device, parallelised, materialised on ``device`` with fresh
    weights drawn from ``cfg.train.seed`` (a resumed run then loads its checkpoint into it).

    Alone, the weights are drawn on ``device``. Across ranks, each rank draws the whole model's weights
    on the CPU and keeps its shards (the same numbers as one CPU process draws; the memory of one whole
    model per rank while it starts). With pipeline stages the model is this rank's
    ``pipeline.Pipelined`` stages."""
    torch.manual_seed(cfg.train.seed)
    with torch.device("meta"):
        model = Transformer(args)
    if dist is not None and dist.layout.pp > 1:
        from llamaherd.train.pipeline import Pipelined, split_model

        stages = split_model(model, dist, cfg.parallel.pp_schedule)
        for stage in stages:
            parallelize(stage, cfg, dist)
            stage.to_empty(device=device)
        model = Pipelined(stages, args, dist, cfg, device)
    else:
        parallelize(model, cfg, dist)
        model.to_empty(device=device)
        if args.tie_embeddings:  # to_empty gives every module its own tensor: tie them again
            model.output.weight = model.tok_embeddings.weight
    model.init_rope(device)
    lean = param_dtype(cfg.train.param_dtype)
    if lean is not None and dist is not None and dist.world > 1:
        raise HerdError(f"train.param_dtype {cfg.train.param_dtype} with {dist.world} processes: expected float32; "
                        "FSDP shards the weights and optimizer states over the processes instead")
    if dist is not None and dist.world > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, fresh_weights(args, cfg.train.seed),
                             options=StateDictOptions(full_state_dict=True, strict=dist.layout.pp == 1))
    else:
        model.init_weights(seed=cfg.train.seed)
    if lean is not None:  # the weights (and so their gradients and AdamW's states) in bf16; RoPE's tables stay float32
        for p in model.parameters():
            p.data = p.data.to(lean)
    return model.train()


def param_dtype(name: str) -> torch.dtype | None:
    """``train.param_dtype``: None for float32 (the default: float32 master weights), else the dtype."""
    if name in ("float32", "fp32"):
        return None
    if name in ("bfloat16", "bf16"):
        return torch.bfloat16
    raise HerdError(f"train.param_dtype {name!r}: expected float32 or bfloat16")


def grad_norm(model: torch.nn.Module, dist=None) -> torch.Tensor:
    """The global 2-norm of the gradients: sharded gradients (DTensors) count once each, and pipeline
    stages add theirs up."""
    from torch.distributed.tensor import DTensor

    norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    if dist is not None and dist.layout.pp > 1:
        norm = dist.all_reduce(norm.pow(2), "pp").sqrt()
    return norm


def clip_grad_norm(model: torch.nn.Module, max_norm: float, dist=None, norm: torch.Tensor | None = None):
    """Scale the gradients so that their global 2-norm is at most ``max_norm``; returns the norm before."""
    norm = grad_norm(model, dist) if norm is None else norm
    torch.nn.utils.clip_grads_with_norm_([p for p in model.parameters() if p.grad is not None], max_norm, norm)
    return norm
