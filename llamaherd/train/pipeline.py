"""Pipeline parallelism: the layers cut into stages on successive ranks, micro-batches flowing through them
(``torch.distributed.pipelining``: the 1F1B, interleaved 1F1B and GPipe schedules).

    stages = split_model(model, dist)          # this rank's StageModules (two per rank when interleaved)
    piped = Pipelined(stages, dist, cfg)       # what the Trainer trains: the stages' parameters by their
                                               # model names, and forward + backward through the schedule

A stage is a part of the ``Transformer`` holding its own modules under the model's names
(``tok_embeddings``, ``layers.<i>``, ``norm``, ``output``), so checkpoints look the same whatever the
layout. Between stages flow the hidden states and the row's document numbers (``doc_ids``), from which
each stage rebuilds its positions and document mask.
"""

from __future__ import annotations

import torch
from torch import nn

from llamaherd.errors import HerdError
from llamaherd.model.masks import doc_mask, doc_positions
from llamaherd.model.transformer import Transformer, rope_table


class StageModule(nn.Module):
    """Layers ``layers`` of ``model`` (and the embedding if ``first``, the final norm and output if ``last``)."""

    def __init__(self, model: Transformer, layers: range, first: bool, last: bool):
        super().__init__()
        self.args = model.args
        self.tok_embeddings = model.tok_embeddings if first else None
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in layers})
        self.norm = model.norm if last else None
        self.output = model.output if last else None

    def init_rope(self, device=None) -> None:
        self.rope_cos, self.rope_sin = rope_table(self.args, device=device)

    def forward(self, x: torch.Tensor, doc_ids: torch.Tensor):
        positions, mask = doc_positions(doc_ids), doc_mask(doc_ids)
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        h = self.tok_embeddings(x) if self.tok_embeddings is not None else x
        for layer in self.layers.values():
            h = layer(h, cos, sin, positions, mask)
        if self.output is not None:
            return self.output(self.norm(h))
        return h, doc_ids


def stage_layers(n_layers: int, n_stages: int) -> list[range]:
    """The layers of each stage: as even as can be, the first stages taking one more."""
    size, extra = divmod(n_layers, n_stages)
    out, start = [], 0
    for s in range(n_stages):
        end = start + size + (s < extra)
        out.append(range(start, end))
        start = end
    return out


def stages_per_rank(schedule: str) -> int:
    return 2 if schedule == "Interleaved1F1B" else 1


def split_model(model: Transformer, dist, schedule: str) -> list[StageModule]:
    """This pipeline rank's stages: stage ``r`` (and ``r + pp`` when interleaved) of ``pp x v`` stages."""
    pp, rank = dist.layout.pp, dist.mesh["pp"].get_local_rank()
    v = stages_per_rank(schedule)
    n_stages = pp * v
    if n_stages > model.args.n_layers:
        raise HerdError(f"parallel.pp {pp} with {schedule}: {n_stages} stages for {model.args.n_layers} layers; "
                        "expected at most one stage per layer")
    ranges = stage_layers(model.args.n_layers, n_stages)
    return [StageModule(model, ranges[s], s == 0, s == n_stages - 1) for s in range(rank, n_stages, pp)]


class Pipelined(nn.Module):
    """This rank's stages as one module to train: their parameters under the model's names (for the
    optimizer and checkpoints), and ``forward_backward`` running a micro-batch through the schedule."""

    def __init__(self, stages: list[StageModule], args, dist, cfg, device: torch.device):
        super().__init__()
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

        self.args, self.dist, self.device = args, dist, device
        for stage in stages:  # the model's names: tok_embeddings, layers.<i>, norm, output
            for name in ("tok_embeddings", "norm", "output"):
                if getattr(stage, name) is not None:
                    setattr(self, name, getattr(stage, name))
        self.layers = nn.ModuleDict({i: block for stage in stages for i, block in stage.layers.items()})
        self._stages = stages  # not registered again: their modules are the ones above
        pp, rank = dist.layout.pp, dist.mesh["pp"].get_local_rank()
        v = len(stages)
        self.first, self.last = rank == 0, rank == pp - 1
        group = dist.mesh["pp"].get_group()
        piped = [PipelineStage(stage, rank + i * pp, pp * v, device, group=group) for i, stage in enumerate(stages)]
        self.microbatches = cfg.parallel.microbatches or pp
        rows = cfg.train.batch_size // dist.dp_size
        if rows % self.microbatches:
            raise HerdError(f"parallel.microbatches {self.microbatches}: does not divide the {rows} rows each "
                            "data-parallel rank gets per micro-batch (train.batch_size / data-parallel ranks)")
        self.scale = 1.0
        loss_fn = self._loss
        kinds = {"1F1B": Schedule1F1B, "GPipe": ScheduleGPipe, "Interleaved1F1B": ScheduleInterleaved1F1B}
        kind = kinds[cfg.parallel.pp_schedule]
        if v > 1:
            self.schedule = kind(piped, self.microbatches, loss_fn=loss_fn, scale_grads=False)
        else:
            self.schedule = kind(piped[0], self.microbatches, loss_fn=loss_fn, scale_grads=False)

    def _loss(self, logits, targets):
        from llamaherd.train.losses import cross_entropy

        return cross_entropy(logits, targets, "sum") * self.scale

    def _run(self, batch, train: bool) -> torch.Tensor:
        args = (batch.inputs, batch.doc_ids) if self.first else ()
        losses: list = []
        kw = {"target": batch.targets, "losses": losses} if self.last else {}
        if train:
            self.schedule.step(*args, **kw)
        else:
            self.schedule.eval(*args, **kw)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for loss in losses:  # on the last stage: each micro-batch's scaled loss
            total += (loss.full_tensor() if hasattr(loss, "full_tensor") else loss).detach().double()
        return self.dist.all_reduce(total, "pp")  # every stage learns it

    def forward_backward(self, batch, scale: float) -> torch.Tensor:
        """Forward and backward of one micro-batch through every stage; the loss sum x ``scale``."""
        self.scale = scale
        return self._run(batch, train=True)

    @torch.no_grad()
    def loss_sum(self, batch) -> torch.Tensor:
        """The loss summed over a batch's targets, forward only."""
        self.scale = 1.0
        return self._run(batch, train=False)

    def init_rope(self, device=None) -> None:
        for stage in self._stages:
            stage.init_rope(device)
