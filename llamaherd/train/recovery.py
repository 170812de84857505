"""What keeps a long run going without a person: anomaly detection, silent-data-corruption checks, injected
faults for drills, and goodput (where the wall time went).

The Trainer asks, every step, before the optimizer applies the update:

    watch.check(step, loss, grad_norm, batches)   # raises Anomaly: NaN/Inf, or a loss spike (z-score)

and every ``recovery.sdc_every`` steps ``replica_mismatch(model, dist)`` (HSDP replicas must hold the same
parameters bit for bit). On an ``Anomaly`` it rolls back to the newest good checkpoint and skips the
offending step's batches (named in the log and in metrics.jsonl). A crashed or killed process is
torchrun's to restart (``--max-restarts``); the restarted run resumes from the newest good checkpoint.
"""

from __future__ import annotations

import math
import os
import signal
import time
from collections import defaultdict
from contextlib import contextmanager

import torch


class Anomaly(Exception):
    """A step that must not count: why, which step, the loader positions of its batches, the ranks at fault."""

    def __init__(self, reason: str, step: int, batches: list[int] | None = None, ranks: list[int] | None = None,
                 detail: str = ""):
        super().__init__(f"step {step}: {reason}{': ' + detail if detail else ''}")
        self.reason, self.step, self.batches, self.ranks, self.detail = reason, step, batches or [], ranks or [], detail


class Watch:
    """NaN/Inf and loss-spike detection over a moving window of recent losses (part of the train state, so a
    resumed run judges exactly as an uninterrupted one)."""

    def __init__(self, rcfg):
        self.cfg = rcfg
        self.window: list[float] = []

    def check(self, step: int, loss: float, grad_norm: float, batches: list[int]) -> None:
        if self.cfg.check_nan and not (math.isfinite(loss) and math.isfinite(grad_norm)):
            what = "loss" if not math.isfinite(loss) else "gradient norm"
            raise Anomaly("nan", step, batches, detail=f"{what} is {loss if what == 'loss' else grad_norm}")
        z = self.zscore(loss)
        if z is not None and z > self.cfg.spike_zscore:
            raise Anomaly("spike", step, batches, detail=f"loss {loss:.4f} is {z:.1f} standard deviations above "
                                                         f"the mean of the last {len(self.window)} steps")

    def zscore(self, loss: float) -> float | None:
        if not self.cfg.spike_zscore or len(self.window) < max(self.cfg.spike_warmup, 2):
            return None
        mean = sum(self.window) / len(self.window)
        std = math.sqrt(sum((x - mean) ** 2 for x in self.window) / len(self.window))
        return (loss - mean) / std if std > 0 else None

    def accept(self, loss: float) -> None:
        self.window = (self.window + [loss])[-self.cfg.spike_window:]

    def state_dict(self) -> dict:
        return {"window": list(self.window)}

    def load_state_dict(self, state: dict | None) -> None:
        self.window = list((state or {}).get("window", []))


def checksum(tensors) -> int:
    """A bitwise checksum of tensors (their bytes as integers, summed): equal tensors, equal sums."""
    total = torch.zeros((), dtype=torch.int64)
    for t in tensors:
        t = t.detach().contiguous().cpu()
        width = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
        ints = t.view(width).to(torch.int64)
        # weighted by position, so that two swapped values change it too
        total += (ints * (torch.arange(ints.numel(), dtype=torch.int64).view(ints.shape) % 8191 + 1)).sum()
    return int(total)


def replica_mismatch(model, dist) -> list[int]:
    """The ranks whose parameters differ from their data-parallel replicas' (HSDP replicas hold the same
    shards bit for bit); [] when all agree or there are no replicas. With three or more replicas the odd one
    out is named; with two, both. Every rank gets the same answer."""
    if dist.mesh is None or dist.layout.dp_replicate < 2:
        return []
    import torch.distributed as tdist

    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    mine = checksum(local)
    group = dist.mesh["dp_replicate"]
    sums: list = [None] * dist.layout.dp_replicate
    tdist.all_gather_object(sums, (dist.rank, mine), group=group.get_group())
    values = [v for _, v in sums]
    majority = max(set(values), key=values.count)
    bad = [r for r, v in sums if v != majority] if values.count(majority) * 2 > len(values) else \
        [r for r, v in sums if len(set(values)) > 1]
    everyone: list = [None] * dist.world
    tdist.all_gather_object(everyone, bad)
    return sorted({r for part in everyone for r in part})


class Faults:
    """``fault.*``: injected failures, each firing once in this process."""

    def __init__(self, fcfg, rank: int):
        self.cfg, self.rank = fcfg, rank
        self.fired: set[str] = set()

    def _once(self, name: str, at: int, step: int) -> bool:
        if at and at == step and name not in self.fired:
            self.fired.add(name)
            return True
        return False

    def loss_factor(self, step: int) -> float:
        """What this step's loss is multiplied by: NaN, the spike factor, or 1."""
        if self._once("nan", self.cfg.nan_at_step, step):
            return float("nan")
        if self._once("spike", self.cfg.spike_at_step, step):
            return float(self.cfg.spike_factor)
        return 1.0

    def _mine(self, spec: list, step: int) -> bool:
        return len(spec) == 2 and spec[0] == self.rank and spec[1] == step and \
            os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"

    def maybe_kill(self, step: int) -> None:
        """``fault.kill_rank_at_step = [rank, step]``: that rank dies by SIGKILL, in torchrun's first attempt;
        ``fault.hang_rank_at_step``: that rank stops responding (the others' next collective times out)."""
        if self._mine(self.cfg.kill_rank_at_step, step):
            os.kill(os.getpid(), signal.SIGKILL)
        if self._mine(self.cfg.hang_rank_at_step, step):
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # hung, but torchrun's SIGTERM still ends it
            while True:
                time.sleep(3600)

    @torch.no_grad()
    def maybe_corrupt(self, model, step: int) -> None:
        """``fault.corrupt_rank``: one value of this rank's first parameter changes, as a bad bit would."""
        if self.cfg.corrupt_rank == self.rank and self._once("corrupt", self.cfg.corrupt_at_step, step):
            p = next(model.parameters())
            local = p.to_local() if hasattr(p, "to_local") else p
            local.view(-1)[0] += 1.0


class Goodput:
    """Wall time since the Trainer began, in phases: each one timed where it happens, so that they add up
    to the wall time (up to the loop's own few microseconds a step)."""

    PHASES = ("startup", "train", "eval", "checkpoint", "recovery", "lost", "log")

    def __init__(self):
        self.start = time.perf_counter()
        self.seconds: dict[str, float] = defaultdict(float)
        self.steps: dict[int, float] = {}  # the train seconds of each step since the last checkpoint

    @contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - t0

    def step_done(self, step: int, seconds: float) -> None:
        self.seconds["train"] += seconds
        self.steps[step] = seconds

    def checkpointed(self, step: int) -> None:
        self.steps = {s: t for s, t in self.steps.items() if s > step}

    def lose_after(self, step: int) -> float:
        """A rollback to ``step``: the steps after it were trained for nothing; returns their seconds."""
        lost = sum(t for s, t in self.steps.items() if s > step)
        self.seconds["train"] -= lost
        self.seconds["lost"] += lost
        self.steps = {s: t for s, t in self.steps.items() if s <= step}
        return lost

    def report(self) -> dict:
        wall = time.perf_counter() - self.start
        out = {f"{name}_s": round(self.seconds.get(name, 0.0), 6) for name in self.PHASES}
        out["wall_s"] = round(wall, 6)
        out["effective"] = self.seconds.get("train", 0.0) / wall if wall > 0 else 0.0
        return out
