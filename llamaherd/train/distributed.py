"""Many processes training one model: torchrun's environment, the device mesh, and the few collectives the
Trainer needs. One process is the same code with a world of one.

    torchrun --nproc-per-node 4 -m llamaherd pretrain RECIPE parallel.tp=2   # dp_shard = 4 / 2 = 2
    dist = Distributed.start(cfg, model_args)     # joins the process group, builds the mesh
    dist.mesh["tp"], dist.dp_mesh, dist.dp_rank, dist.dp_size, dist.is_main

The mesh is ``[pp, dp_replicate, dp_shard, tp]`` (PyTorch's DeviceMesh; dimensions of size 1 included):
tensor parallel innermost, where ranks talk most, then FSDP's shards, HSDP's replicas, and the pipeline
stages outermost. A layout that cannot work is a one-line error before any process group is made.
"""

from __future__ import annotations

import logging
import os
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta

import torch

from llamaherd.errors import HerdError

SCHEDULES = ("1F1B", "Interleaved1F1B", "GPipe")
MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")


@dataclass(frozen=True)
class Layout:
    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1

    @property
    def world(self) -> int:
        return self.pp * self.dp_replicate * self.dp_shard * self.tp

    @property
    def dp(self) -> int:
        """Data-parallel ranks: each sees its own rows of every global batch."""
        return self.dp_replicate * self.dp_shard

    def describe(self) -> str:
        return " x ".join(f"{name} {getattr(self, name)}" for name in MESH_DIMS)


def plan_layout(pcfg, world: int, args=None, batch_size: int | None = None, seq_len: int | None = None) -> Layout:
    """The layout ``parallel.*`` asks for on ``world`` processes, checked against the model and the batch."""
    for name in ("dp_replicate", "tp", "pp"):
        value = getattr(pcfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise HerdError(f"parallel.{name} = {value!r}: expected an integer >= 1")
    shard = pcfg.dp_shard
    if isinstance(shard, bool) or not isinstance(shard, int) or (shard < 1 and shard != -1):
        raise HerdError(f"parallel.dp_shard = {shard!r}: expected an integer >= 1, or -1 for what the world "
                        "size leaves")
    others = pcfg.pp * pcfg.dp_replicate * pcfg.tp
    if shard == -1:
        if world % others:
            raise HerdError(f"parallel: pp {pcfg.pp} x dp_replicate {pcfg.dp_replicate} x tp {pcfg.tp} = {others} "
                            f"does not divide the world size {world}")
        shard = world // others
    layout = Layout(pcfg.pp, pcfg.dp_replicate, shard, pcfg.tp)
    if layout.world != world:
        raise HerdError(f"parallel: {layout.describe()} = {layout.world} processes, but the world size is {world}")
    if pcfg.pp_schedule not in SCHEDULES:
        raise HerdError(f"parallel.pp_schedule = {pcfg.pp_schedule!r}: expected one of {', '.join(SCHEDULES)}")
    if isinstance(pcfg.microbatches, bool) or not isinstance(pcfg.microbatches, int) or pcfg.microbatches < 0:
        raise HerdError(f"parallel.microbatches = {pcfg.microbatches!r}: expected an integer >= 0 (0: one per stage)")
    if args is not None:
        if layout.tp > args.n_kv_heads or args.n_kv_heads % layout.tp or args.n_heads % layout.tp:
            raise HerdError(f"parallel.tp = {layout.tp}: must divide the model's {args.n_kv_heads} KV heads "
                            f"(and {args.n_heads} heads)")
        if layout.pp > args.n_layers:
            raise HerdError(f"parallel.pp = {layout.pp}: more pipeline stages than the model's {args.n_layers} layers")
        if layout.pp > 1 and args.tie_embeddings:
            raise HerdError("parallel.pp > 1: the first and last stages cannot share the tied embedding; "
                            "set model.tie_embeddings=false")
    if batch_size is not None and batch_size % layout.dp:
        raise HerdError(f"train.batch_size {batch_size} (rows per micro-batch, all ranks together) is not a "
                        f"multiple of the {layout.dp} data-parallel ranks")
    if seq_len is not None and seq_len % layout.tp:
        raise HerdError(f"train.seq_len {seq_len} is not a multiple of parallel.tp {layout.tp} "
                        "(sequence parallelism splits each row)")
    return layout


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise HerdError(f"train.device: {name!r} is not a device (expected auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise HerdError(f"train.device: {name!r} was asked for but no CUDA GPU is available")
    return device


def autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None: plain float32). Weights and optimizer state always stay float32."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if name in ("float32", "fp32"):
        return None
    if name in ("bfloat16", "bf16"):
        return torch.bfloat16
    raise HerdError(f"train.dtype: {name!r} is not supported (expected auto, float32 or bfloat16)")


def _attempt_store(world: int, timeout: timedelta):
    """torchrun's own key-value store, with keys under this restart attempt's prefix; None outside torchrun.

    torchrun's agent keeps one store for the whole job, and every attempt's workers meet there. A worker
    of a restarted attempt could otherwise read the previous attempt's process-group keys (with gloo on
    torch 2.13: stale addresses, and a hang or a failed connection; pytorch issue #167288)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    import torch.distributed as dist

    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                         timeout=timeout)
    return dist.PrefixStore(f"llamaherd/attempt_{attempt}", base)


class Distributed:
    """The processes of one run and how they are laid out; ``Distributed()`` is the world of one."""

    def __init__(self, layout: Layout = Layout(), device: torch.device | None = None, mesh=None, rank: int = 0):
        self.layout, self.mesh, self.rank = layout, mesh, rank
        self.device = device or torch.device("cpu")
        self._dp_flat = None

    # --- starting and stopping ---------------------------------------------------------------------

    @classmethod
    def start(cls, cfg, args=None, device: torch.device | None = None) -> "Distributed":
        """Join torchrun's process group (``WORLD_SIZE`` > 1) and build the mesh, or a world of one. A
        collective that takes longer than ``recovery.collective_timeout_s`` fails the process (torchrun
        then restarts the job, which resumes from its newest good checkpoint)."""
        timeout_s = cfg.recovery.collective_timeout_s
        world = int(os.environ.get("WORLD_SIZE", "1"))
        layout = plan_layout(cfg.parallel, world, args, cfg.train.batch_size, cfg.train.seq_len)
        if world == 1:
            return cls(layout, device)
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device is None or device.type == "cuda":
            device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # gathering a whole checkpoint from FSDP x TP shards warns that it takes two all-gathers: it does
        logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
        if not dist.is_initialized():
            backend, timeout = "nccl" if device.type == "cuda" else "gloo", timedelta(seconds=timeout_s)
            store = _attempt_store(world, timeout)
            if store is None:
                dist.init_process_group(backend, timeout=timeout)
            else:
                dist.init_process_group(backend, store=store, rank=int(os.environ["RANK"]), world_size=world,
                                        timeout=timeout)
        mesh = init_device_mesh(device.type, (layout.pp, layout.dp_replicate, layout.dp_shard, layout.tp),
                                mesh_dim_names=MESH_DIMS)
        made = cls(layout, device, mesh, dist.get_rank())
        made._dp_flat = mesh["dp_replicate", "dp_shard"]._flatten("dp")  # every data-parallel rank: one group
        return made

    def close(self, clean: bool = True) -> None:
        """Leave the process group. After a clean finish, once every rank is here (a rank that tears its
        connections down while another still uses them can abort the other's process); after an error at
        once (the others may never get here)."""
        if self.mesh is not None:
            import torch.distributed as dist

            if dist.is_initialized():
                try:
                    if clean:
                        dist.barrier()
                finally:
                    dist.destroy_process_group()
            self.mesh = None

    # --- where this rank is --------------------------------------------------------------------------

    @property
    def world(self) -> int:
        return self.layout.world

    @property
    def is_main(self) -> bool:
        """The rank that logs, writes metrics and checkpoint files."""
        return self.rank == 0

    @property
    def dp_size(self) -> int:
        return self.layout.dp

    @property
    def dp_rank(self) -> int:
        if self.mesh is None:
            return 0
        replica, shard = self.mesh["dp_replicate"].get_local_rank(), self.mesh["dp_shard"].get_local_rank()
        return replica * self.layout.dp_shard + shard

    @property
    def dp_mesh(self):
        """FSDP's mesh: the shards, or replicas x shards (HSDP); None without data parallelism."""
        if self.mesh is None or self.layout.dp == 1:
            return None
        if self.layout.dp_replicate > 1:
            return self.mesh["dp_replicate", "dp_shard"]
        return self.mesh["dp_shard"]

    @property
    def tp_mesh(self):
        return self.mesh["tp"] if self.mesh is not None and self.layout.tp > 1 else None

    def loss_context(self, loss_parallel: bool):
        """Where the loss and its backward run: over vocabulary shards with tensor parallelism."""
        if self.tp_mesh is not None and loss_parallel:
            from torch.distributed.tensor.parallel import loss_parallel as context

            return context()
        return nullcontext()

    # --- collectives -------------------------------------------------------------------------------------

    def _group(self, over: str):
        if over == "dp":
            return self._dp_flat.get_group() if self.layout.dp > 1 else None
        if over == "pp":
            return self.mesh["pp"].get_group() if self.layout.pp > 1 else None
        return "world"

    def all_reduce(self, tensor: torch.Tensor, over: str = "dp", op: str = "sum") -> torch.Tensor:
        """``tensor`` summed (or maxed) over the data-parallel ranks (``over="dp"``), the pipeline stages
        (``"pp"``) or every rank (``"world"``); in place, and returned."""
        if self.mesh is None:
            return tensor
        group = self._group(over)
        if group is None:
            return tensor
        import torch.distributed as dist

        reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
        dist.all_reduce(tensor, op=reduce_op, group=None if group == "world" else group)
        return tensor

    def merge_stages(self, model: dict, optim: dict) -> tuple[dict, dict]:
        """The whole model's and optimizer's state from each pipeline stage's part (keyed by parameter name),
        on the CPU of every rank."""
        import torch.distributed as dist

        cpu = {k: v.cpu() for k, v in model.items()}
        moments = {k: {n: t.cpu() if isinstance(t, torch.Tensor) else t for n, t in v.items()}
                   for k, v in optim["state"].items()}
        parts: list = [None] * self.layout.pp
        dist.all_gather_object(parts, (cpu, moments, optim["param_groups"]), group=self.mesh["pp"].get_group())
        whole_model, state, groups = {}, {}, None
        for part_model, part_state, part_groups in parts:
            whole_model.update(part_model)
            state.update(part_state)
            if groups is None:
                groups = [{**g, "params": list(g["params"])} for g in part_groups]
            else:
                for g, more in zip(groups, part_groups, strict=True):
                    g["params"] += more["params"]
        return whole_model, {"state": state, "param_groups": groups}

    def ranks_where(self, flag: bool) -> list[int]:
        """The ranks on which ``flag`` holds (every rank gets the list)."""
        if self.mesh is None:
            return [0] if flag else []
        import torch.distributed as dist

        flags: list = [None] * self.world
        dist.all_gather_object(flags, (self.rank, flag))
        return [rank for rank, f in flags if f]

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` holds on some rank (every rank gets the same answer)."""
        if self.mesh is None:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        return bool(self.all_reduce(t, "world", "max").item())

    def barrier(self) -> None:
        if self.mesh is not None:
            import torch.distributed as dist

            dist.barrier()
