"""The training loop that every training stage shares: pretraining today; SFT, the reward model and DPO next.

    trainer = Trainer(model, NextTokenLoss(), data, cfg, run_dir, tokenizer=tok, eval_data=val_batches)
    trainer.resume()            # the newest good checkpoint in run_dir, if there is one
    result = trainer.fit()      # train to cfg.train.steps

    fit():  for step in step+1 .. steps:
                train_step(): lr <- warmup + cosine(step)
                              grad_accum x [loss(model, next(data)).backward()]; clip; AdamW step
                log; every eval_every steps evaluate(); every checkpoint.every steps save()

Stages differ in their model, their loss (``loss(model, batch) -> LossOutput``, see losses.py) and
their data (an iterator of batches with ``state_dict`` / ``load_state_dict``), not in the loop. The
model arrives built and parallelised (``parallel.build_model``). Everything that decides the next step
(weights, optimizer moments, data position, RNG, step) is in ``state_dict()`` and in every checkpoint,
so a run killed at any moment and started again ends bit-identical to one never stopped.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from llamaherd.checkpoint import runs
from llamaherd.config import RunConfig
from llamaherd.errors import HerdError
from llamaherd.model.args import flops_per_token
from llamaherd.train.distributed import Distributed, autocast_dtype, resolve_device  # noqa: F401 (re-exported)
from llamaherd.train.losses import LossOutput
from llamaherd.train.metrics import MetricsLog, bits_per_byte, memory_gib, peak_flops
from llamaherd.train.parallel import clip_grad_norm, grad_norm, is_distributed
from llamaherd.train.recovery import Anomaly, Faults, Goodput, Watch, replica_mismatch


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    steps: int
    resumed_from: int
    stopped_by: str | None  # "SIGTERM" / "SIGINT" when interrupted, else None
    train_loss: float  # mean over the last log_every steps
    val_loss: float | None
    val_bpb: float | None
    tokens_seen: int
    tokens_per_s: float
    checkpoint: Path | None
    goodput: dict | None = None  # seconds per phase of this process's training, and the effective share


def lr_at(step: int, cfg) -> float:
    """Linear warmup to cfg.lr over warmup_steps, then cosine decay to lr * min_lr_ratio at cfg.steps."""
    if step <= cfg.warmup_steps:
        return cfg.lr * step / max(cfg.warmup_steps, 1)
    progress = min(1.0, (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model, cfg) -> torch.optim.Optimizer:
    """AdamW over the parameters that train (frozen ones, e.g. under LoRA, are left out); weight decay on
    matrices only (not on norm weights); the fused kernel on CPU and GPU."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = next(model.parameters()).device.type in ("cpu", "cuda")  # several times faster than foreach
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=fused)


class Trainer:
    """Trains ``model`` on ``data`` by minimising ``loss``, as ``cfg.train`` and ``cfg.checkpoint`` say.

    model: built and parallelised, on its device (``parallel.build_model``); it has ``.args``.
    loss: ``loss(model, batch) -> LossOutput``; run under autocast when ``cfg.train.dtype`` asks for it.
    data: an endless iterator of batches (``batch.to(device)``) with ``state_dict`` / ``load_state_dict``.
    run_dir: where ``metrics.jsonl`` and ``checkpoints/step_*`` go (checked writable at once); ``tokenizer``
        is saved with each checkpoint.
    eval_data: a function returning the validation batches, the same ones each time (None: no evaluation).
    eval_text: (tokens predicted, bytes of text) of the whole validation set, to log bits per byte too.
    optimizer: default AdamW as ``cfg.train`` says (``make_optimizer``); ``name`` labels the progress bar.
    dist: the ranks of a distributed run (``train.distributed.Distributed``); each rank's ``data`` serves its
        own rows. Rank 0 logs and writes the files; checkpoints hold the whole model, whatever the layout.
    """

    def __init__(self, model: torch.nn.Module, loss: Callable[..., LossOutput], data: Iterator, cfg: RunConfig,
                 run_dir: str | Path, *, tokenizer=None, eval_data: Callable[[], Iterable] | None = None,
                 eval_text: tuple[int, int] | None = None, optimizer: torch.optim.Optimizer | None = None,
                 name: str = "train", progress: bool = True, console=None, dist: Distributed | None = None):
        self.model, self.loss, self.data, self.cfg = model, loss, data, cfg
        self.run_dir, self.tokenizer = Path(run_dir), tokenizer
        self.eval_data, self.eval_text = eval_data, eval_text
        self.dist = dist or Distributed()
        self.device = next(model.parameters()).device
        self.amp_dtype = autocast_dtype(cfg.train.dtype, self.device)
        self.optimizer = optimizer if optimizer is not None else make_optimizer(model, cfg.train)
        self.name, self.progress, self.console = name, progress and self.dist.is_main, console
        self.step = 0
        self.resumed_from: Path | None = None  # the checkpoint resume() loaded
        self.watch, self.faults = Watch(cfg.recovery), Faults(cfg.fault, self.dist.rank)
        self.skipped: set[int] = set()  # loader positions of batches that rollbacks skip
        self.rollbacks = 0
        self.goodput = Goodput()
        if self.dist.is_main:
            check_writable(self.run_dir)

    # --- state ---------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything that decides the next step: weights, optimizer moments, data position, RNG, step.
        Weights and moments are whole (gathered from every rank: call it on every rank), keyed by
        parameter name, so that any layout can load them."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        whole = _whole(self.dist)
        model = get_model_state_dict(self.model, options=whole)
        optim = get_optimizer_state_dict(self.model, self.optimizer, options=whole)
        if self.dist.layout.pp > 1:  # each pipeline stage has its part: put them together
            model, optim = self.dist.merge_stages(model, optim)
        return {"model": model, "optimizer": optim, **self.state_dict_extras()}

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        whole = _whole(self.dist)
        optim = state["optimizer"]
        if self.dist.layout.pp > 1:  # this rank's stages take their part of the whole
            mine = set(self.model.state_dict())
            optim = _stage_part(optim, mine)
            whole = dataclasses.replace(whole, strict=False)
        set_model_state_dict(self.model, state["model"], options=whole)
        if any(isinstance(k, int) for k in optim.get("state", {})):  # written by torch's own state_dict()
            self.optimizer.load_state_dict(optim)
        else:
            set_optimizer_state_dict(self.model, self.optimizer, optim, options=whole)
        self._load_extras(state)

    def _load_extras(self, state: dict) -> None:
        self.data.load_state_dict(state["loader"])
        self.watch.load_state_dict(state.get("watch"))
        self.skipped = set(state.get("skipped_batches", ()))
        torch.set_rng_state(state["rng_cpu"])
        if self.device.type == "cuda" and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(state["rng_cuda"], self.device)
        self.step = state["step"]

    def save(self) -> Path:
        """Checkpoint the current step: the weights as a loadable model, the rest in ``train_state.pt``
        (every rank gathers; rank 0 writes). With ``checkpoint.sharded`` every rank writes its own shards
        instead (``torch.distributed.checkpoint``), in the background with ``checkpoint.async_save``."""
        if self.cfg.checkpoint.sharded:
            return self._save_sharded()
        state = self.state_dict()
        params = state.pop("model")  # written as the checkpoint's model files
        path = runs.step_dir(self.run_dir, self.step)
        if self.dist.is_main:
            path = runs.save_checkpoint(self.run_dir, self.step, self.model, self.tokenizer, state,
                                        self.cfg.checkpoint.keep, params=params)
        self.dist.barrier()
        return path

    def _save_sharded(self) -> Path:
        import shutil

        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        self.finish_saving()  # the previous background save, first
        tmp = runs.sharded_tmp(self.run_dir, self.step)
        if self.dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # a save a crash left half-written
            tmp.mkdir(parents=True)
        self.dist.barrier()
        model, optim = get_state_dict(self.model, self.optimizer)
        pending = (self.step, self.state_dict_extras())
        if self.cfg.checkpoint.async_save and self.dist.world > 1:
            self._pending = (dcp.async_save({"model": model, "optimizer": optim}, checkpoint_id=tmp / "dcp"), *pending)
        else:
            dcp.save({"model": model, "optimizer": optim}, checkpoint_id=tmp / "dcp")
            self._pending = (None, *pending)
            self.finish_saving()
        return runs.step_dir(self.run_dir, self.step)

    def finish_saving(self) -> None:
        """Wait for a background checkpoint and publish it (every rank calls it)."""
        pending, self._pending = getattr(self, "_pending", None), None
        if pending is None:
            return
        future, step, extras = pending
        if future is not None:
            future.result()
        self.dist.barrier()  # every rank's shards are written
        if self.dist.is_main:
            runs.publish_sharded(self.run_dir, step, self.model.args, self.tokenizer, extras,
                                 next(self.model.parameters()).dtype, self.cfg.checkpoint.keep)
        self.dist.barrier()

    def state_dict_extras(self) -> dict:
        """What a checkpoint holds besides the weights and the optimizer's moments."""
        return {"step": self.step, "loader": self.data.state_dict(), "rng_cpu": torch.get_rng_state(),
                "watch": self.watch.state_dict(), "skipped_batches": sorted(self.skipped),
                "rng_cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None}

    def resume(self) -> Path | None:
        """Continue from the newest checkpoint in ``run_dir`` whose checksums verify (damaged ones are
        reported and skipped); returns it, or None when there is none. Every rank reads it."""

        ckpt = runs.latest_good(self.run_dir, warn=self._log)
        if ckpt is None:
            return None
        self._load(ckpt)
        self.resumed_from = ckpt
        return ckpt

    def _load(self, ckpt: Path) -> None:
        """Load checkpoint ``ckpt`` into this trainer (weights, optimizer, loader, RNG, step, watch)."""
        from llamaherd.checkpoint import load
        from llamaherd.checkpoint.native import SHARDS, WEIGHTS, read_args

        if not (ckpt / WEIGHTS).is_file() and (ckpt / SHARDS).is_dir():  # sharded: each rank reads its part
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

            if read_args(ckpt) != self.model.args:
                raise HerdError(f"{ckpt}: was trained with different model settings than this recipe; "
                                "use another --out")
            model, optim = get_state_dict(self.model, self.optimizer)
            state = {"model": model, "optimizer": optim}
            dcp.load(state, checkpoint_id=ckpt / SHARDS)
            set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optimizer"])
            self._load_extras(runs.load_train_state(ckpt))
            return

        local = not is_distributed(self.model)
        dtype = next(self.model.parameters()).dtype
        trained, _ = load(ckpt, device=self.device if local else "cpu", dtype=dtype, tokenizer=False)
        if trained.args != self.model.args:
            raise HerdError(f"{ckpt}: was trained with different model settings than this recipe; use another --out")
        state = runs.load_train_state(ckpt)
        self.load_state_dict({**state, "model": trained.state_dict()})

    # --- one step, one evaluation ----------------------------------------------------------------

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext()

    def train_step(self) -> dict:
        """One optimizer step over ``grad_accum`` micro-batches; returns its record for metrics.jsonl.

        A loss with ``units`` is normalised by the units of the whole step (all micro-batches, all
        data-parallel ranks); FSDP averages gradients over those ranks, which the scale undoes. Before the
        update is applied the step is checked (``recovery.*``): an ``Anomaly`` leaves the weights as they were."""
        tcfg, rcfg, dist = self.cfg.train, self.cfg.recovery, self.dist
        self.faults.maybe_kill(self.step + 1)
        self.step += 1
        lr = lr_at(self.step, tcfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batches, positions = [], []
        for _ in range(tcfg.grad_accum):
            while self.skipped and getattr(self.data, "batches", None) in self.skipped:
                next(self.data)  # a batch a rollback skipped
            positions.append(getattr(self.data, "batches", None))
            batches.append(next(self.data))
        factor = self.faults.loss_factor(self.step)
        try:
            mine, extra = self._forward_backward(batches, factor)
            if rcfg.recompute_every and self.step % rcfg.recompute_every == 0:
                self._recompute(batches, factor, mine, positions)
            total = dist.all_reduce(mine.clone(), "dp")
            norm = grad_norm(self.model, dist)
            reduced = [dist.all_reduce(value, "dp") for value in extra.values()]
            # the step's one host sync, before the update (the checks must see the loss and the norm): the
            # optimizer's kernels are then queued without waiting, and run while the host fetches the next batch
            loss_sum, norm_value, *metric_values = torch.stack(
                [t.detach().double().reshape(()) for t in (total, norm, *reduced)]).tolist()
            self.watch.check(self.step, loss_sum, norm_value, positions)
        except Anomaly:
            self.optimizer.zero_grad(set_to_none=True)
            raise
        clip_grad_norm(self.model, tcfg.grad_clip, dist, norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.watch.accept(loss_sum)
        self.faults.maybe_corrupt(self.model, self.step)
        return {"step": self.step, "loss": loss_sum, "grad_norm": norm_value, "lr": lr,
                **dict(zip(extra, metric_values, strict=True))}

    def _forward_backward(self, batches: list, factor: float = 1.0) -> tuple[torch.Tensor, dict]:
        """Forward and backward of the step's micro-batches, gradients accumulated; (this rank's share of the
        step's loss, its share of each metric) as float64 tensors. ``factor`` multiplies the loss (faults)."""
        tcfg, dist = self.cfg.train, self.dist
        units = getattr(self.loss, "units", None)
        if units is not None:
            n = torch.tensor(float(sum(int(units(b)) for b in batches)), dtype=torch.float64, device=self.device)
            n = max(float(dist.all_reduce(n, "dp")), 1.0)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)  # summed on the device: one sync
        extra: dict[str, torch.Tensor] = {}
        piped = getattr(self.model, "forward_backward", None)
        if piped is not None and units is None:
            raise HerdError("pipeline parallelism needs a loss that counts its units (loss.units)")
        for batch in batches:
            batch = batch.to(self.device, non_blocking=True)
            if piped is not None:  # the pipeline schedule runs forward and backward through every stage
                with self._autocast(), dist.loss_context(self.cfg.parallel.loss_parallel):
                    loss_sum += piped(batch, factor * dist.dp_size / n) / dist.dp_size
                continue
            with self._autocast(), dist.loss_context(self.cfg.parallel.loss_parallel):
                out = self.loss(self.model, batch)
                if units is not None and out.total is not None:
                    loss, share = out.total * (factor * dist.dp_size / n), _plain(out.total).detach() * factor / n
                else:
                    loss = out.loss * (factor / tcfg.grad_accum)
                    share = _plain(out.loss).detach() * factor / (tcfg.grad_accum * dist.dp_size)
                loss.backward()
            loss_sum += share
            for name, value in out.metrics.items():
                extra[name] = extra.get(name, 0.0) + _plain(value).detach().double() / (tcfg.grad_accum * dist.dp_size)
        return loss_sum, extra

    def _recompute(self, batches: list, factor: float, first: torch.Tensor, positions: list) -> None:
        """Run the step again from the same weights: every rank must get its own loss share bit for bit, or
        its hardware computed something else the second time (``recovery.recompute_every``)."""
        self.optimizer.zero_grad(set_to_none=True)
        again, _ = self._forward_backward(batches, factor)
        bad = self.dist.ranks_where(not torch.equal(first, again))
        if bad:
            raise Anomaly("recompute", self.step, positions, bad,
                          detail=f"rank(s) {', '.join(map(str, bad))} computed a different loss the second time")

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Validation loss: the loss's mean over every unit of the validation batches (``val_loss``),
        and in bits per byte of text when ``eval_text`` is known (``val_bpb``). Data-parallel ranks
        take their share of each batch's rows."""
        if self.eval_data is None:
            raise HerdError("evaluate: this Trainer was given no eval_data")
        dist = self.dist
        self.model.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # loss x units, units
        piped = getattr(self.model, "loss_sum", None)
        for batch in self.eval_data():
            if dist.dp_size > 1 or piped is not None:  # (packed rows: other batches stay whole)
                rows = dist.dp_size * (self.model.microbatches if piped is not None else 1)
                batch = _rows(_pad_rows(batch, rows), dist.dp_rank, dist.dp_size)
            batch = batch.to(self.device)
            with self._autocast(), dist.loss_context(self.cfg.parallel.loss_parallel):
                if piped is not None:
                    sums[0] += piped(batch)
                    sums[1] += int(self.loss.units(batch))
                    continue
                out = self.loss(self.model, batch)
            n = int(out.count)
            if n:
                sums[0] += float(_plain(out.loss)) * n
                sums[1] += n
        self.model.train()
        total, count = dist.all_reduce(sums, "dp").tolist()
        if count == 0:
            raise HerdError("validation set has no tokens to predict")
        val = total / count
        return {"val_loss": val, "val_bpb": bits_per_byte(val, *self.eval_text) if self.eval_text else None}

    # --- the loop ----------------------------------------------------------------------------------

    def _log(self, message: str) -> None:
        if not self.dist.is_main:
            return
        if self.console is None:
            print(message)
        else:
            self.console.print(message, soft_wrap=True, highlight=False, markup=False)

    def fit(self) -> TrainResult:
        """Train from the current step to ``cfg.train.steps``: log every step, evaluate and checkpoint as
        configured; SIGTERM / SIGINT checkpoint and stop after the current step. An anomaly (``recovery.*``)
        rolls back to the newest good checkpoint and skips the step's batches. The wall time is accounted
        in ``goodput`` phases, written to metrics.jsonl at the end."""
        tcfg, ccfg, rcfg, run_dir = self.cfg.train, self.cfg.checkpoint, self.cfg.recovery, self.run_dir
        gp = self.goodput
        metrics = (MetricsLog(run_dir / "metrics.jsonl", run_dir / "tensorboard" if tcfg.tensorboard else None)
                   if self.dist.is_main else _NoMetrics())
        start = self.step
        metrics.truncate_after(start)  # records past the checkpoint are redone, bit for bit
        if start >= tcfg.steps:
            self._log(f"{run_dir}: already trained to step {start} of {tcfg.steps}; nothing to do")
        elif start:
            self._log(f"resuming from {self.resumed_from} (step {start})")
        tokens_per_step = tcfg.batch_size * tcfg.seq_len * tcfg.grad_accum
        flops_tok = flops_per_token(self.model.args, tcfg.seq_len)
        peak = peak_flops(self.device) if self.amp_dtype == torch.bfloat16 else None

        train_loss = val_loss = val_bpb = None
        recent: list[float] = []  # the last log_every losses: the reported train loss is their mean
        last_ckpt, stopped_by = self.resumed_from, None
        t_run = time.perf_counter()
        t_log, tokens_since = time.perf_counter(), 0
        self.model.train()
        gp.seconds["startup"] = t_run - gp.start  # building, resuming: everything before the loop
        with _StopSignals() as stop, _progress(self.progress, self.console) as bar:
            task = bar.add_task(self.name, total=tcfg.steps, completed=start, loss=float("nan"))
            while self.step < tcfg.steps:
                t_step = time.perf_counter()
                try:
                    record = self.train_step()
                except Anomaly as anomaly:
                    gp.seconds["lost"] += time.perf_counter() - t_step
                    with gp.phase("recovery"):
                        self._recover(anomaly, metrics)
                    recent = []
                    bar.update(task, completed=self.step)
                    continue
                step = self.step
                gp.step_done(step, time.perf_counter() - t_step)
                with gp.phase("log"):
                    recent = (recent + [record["loss"]])[-tcfg.log_every:]
                    train_loss, tokens_since = sum(recent) / len(recent), tokens_since + tokens_per_step
                    if step % tcfg.log_every == 0 or step == tcfg.steps:
                        elapsed = time.perf_counter() - t_log
                        tps = tokens_since / elapsed if elapsed > 0 else 0.0
                        record.update(tokens_per_s=tps, memory_gib=memory_gib(self.device),
                                      mfu=(tps * flops_tok / peak) if peak else None)
                        t_log, tokens_since = time.perf_counter(), 0
                    metrics.write(record)
                    bar.update(task, completed=step, loss=record["loss"])
                if rcfg.sdc_every and step % rcfg.sdc_every == 0:
                    with gp.phase("recovery"):
                        bad = replica_mismatch(self.model, self.dist)
                    if bad:  # (the rollback moves this step's time, and every step's since the checkpoint, to lost)
                        with gp.phase("recovery"):
                            self._recover(Anomaly("sdc", step, ranks=bad, detail=(
                                f"rank(s) {', '.join(map(str, bad))} hold parameters that differ from their "
                                "data-parallel replicas'")), metrics)
                        recent = []
                        bar.update(task, completed=self.step)
                        continue
                if self.eval_data is not None and tcfg.eval_every and (step % tcfg.eval_every == 0
                                                                       or step == tcfg.steps):
                    with gp.phase("eval"):
                        val = self.evaluate()
                        metrics.write({"step": step, **val})
                    val_loss, val_bpb = val["val_loss"], val["val_bpb"]
                with gp.phase("log"):
                    if self.dist.world > 1 and self.dist.any(stop.received is not None):
                        stop.received = stop.received or "SIGTERM"  # another rank was told: every rank stops
                if stop.received or step == tcfg.steps or (ccfg.every and step % ccfg.every == 0):
                    with gp.phase("checkpoint"):
                        last_ckpt = self.save()
                    gp.checkpointed(step)
                if stop.received:
                    stopped_by = stop.received
                    self._log(f"{stopped_by}: checkpoint written at step {step} ({last_ckpt}); "
                              "run the same command to resume")
                    break
        with gp.phase("checkpoint"):
            self.finish_saving()  # a background checkpoint still being written
        goodput = gp.report()
        if self.step > start:
            metrics.write({"step": self.step, "event": "goodput", **goodput})
            phases = ", ".join(f"{k[:-2]} {v:.1f} s" for k, v in goodput.items()
                               if k.endswith("_s") and k != "wall_s" and v)
            self._log(f"goodput: {goodput['effective']:.1%} of {goodput['wall_s']:.1f} s training ({phases})")
        metrics.close()
        if self.step == start:  # nothing left to train: report what the log says
            records = metrics.read()
            losses = [r["loss"] for r in records if "loss" in r][-tcfg.log_every:]
            vals = [r for r in records if "val_loss" in r]
            spent = [r for r in records if r.get("event") == "goodput"]
            goodput = {k: v for k, v in spent[-1].items() if k not in ("step", "event")} if spent else None
            train_loss = sum(losses) / len(losses) if losses else None
            if vals:
                val_loss, val_bpb = vals[-1]["val_loss"], vals[-1]["val_bpb"]
        elapsed, done = time.perf_counter() - t_run, self.step - start
        return TrainResult(run_dir=run_dir, step=self.step, steps=tcfg.steps, resumed_from=start,
                           stopped_by=stopped_by, train_loss=train_loss if train_loss is not None else float("nan"),
                           val_loss=val_loss, val_bpb=val_bpb, tokens_seen=self.step * tokens_per_step,
                           tokens_per_s=done * tokens_per_step / elapsed if elapsed > 0 and done else 0.0,
                           checkpoint=last_ckpt, goodput=goodput)

    def _recover(self, anomaly: Anomaly, metrics) -> None:
        """Roll back to the newest good checkpoint, skipping the anomalous step's batches from now on."""
        self.rollbacks += 1
        if self.rollbacks > self.cfg.recovery.max_rollbacks:
            raise HerdError(f"{anomaly}; that makes {self.rollbacks} rollbacks in this run (recovery.max_rollbacks "
                            f"{self.cfg.recovery.max_rollbacks}): stopping")
        skipped = self.skipped | {b for b in anomaly.batches if b is not None}
        self.finish_saving()  # a checkpoint still being written is complete, and a candidate
        ckpt = runs.latest_good(self.run_dir, warn=self._log)
        if ckpt is not None:
            self._load(ckpt)
        elif anomaly.reason in ("nan", "spike", "recompute"):  # caught before the update: the weights are good
            self.step = anomaly.step - 1
        else:
            raise HerdError(f"{anomaly}; no checkpoint to roll back to yet")
        self.skipped = skipped
        self.goodput.lose_after(self.step)
        metrics.truncate_after(self.step)
        where = f"checkpoint {ckpt.name}" if ckpt is not None else "the weights before it"
        batches = [b for b in anomaly.batches if b is not None]
        metrics.write({"step": anomaly.step, "event": "rollback", "reason": anomaly.reason, "to_step": self.step,
                       "skipped_batches": batches, "ranks": anomaly.ranks, "detail": anomaly.detail})
        self._log(f"{anomaly}; rolled back to {where} (step {self.step})"
                  + (f", skipping batch(es) {', '.join(map(str, batches))}" if batches else ""))


def _whole(dist: Distributed):
    """State-dict options: whole tensors, gathered to rank 0's CPU (with pipeline stages, to every rank of
    a stage: they are put together across stages next)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=dist.world > 1 and dist.layout.pp == 1)


def _plain(t):
    """A DTensor (e.g. a loss computed over vocabulary shards) as the plain tensor it stands for."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _pad_rows(batch, multiple: int):
    """``batch`` with rows added (nothing to predict in them) up to a multiple of ``multiple`` rows, so that
    every data-parallel rank (and pipeline micro-batch) gets as many."""
    pad = -batch.inputs.shape[0] % multiple
    if pad == 0:
        return batch
    from llamaherd.data.loader import IGNORE_INDEX

    def more(t, value):
        return torch.cat([t, t.new_full((pad, *t.shape[1:]), value)])

    return type(batch)(more(batch.inputs, 0), more(batch.targets, IGNORE_INDEX), more(batch.doc_ids, 0))


def _rows(batch, rank: int, ranks: int):
    """Data-parallel rank ``rank``'s share of a batch's rows (a multiple of ``ranks`` of them)."""
    if ranks == 1:
        return batch
    return type(batch)(*(t.tensor_split(ranks)[rank] for t in (batch.inputs, batch.targets, batch.doc_ids)))


def _stage_part(optim: dict, names: set) -> dict:
    """The entries of a whole optimizer state (keyed by parameter name) for the parameters in ``names``."""
    return {"state": {k: v for k, v in optim["state"].items() if k in names},
            "param_groups": [{**g, "params": [p for p in g["params"] if p in names]} for g in optim["param_groups"]]}


class _NoMetrics:
    """What ranks other than rank 0 log to: nothing."""

    def truncate_after(self, step: int) -> None:
        pass

    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass

    def read(self) -> list:
        return []


class _StopSignals:
    """Turns SIGTERM / SIGINT into a request to checkpoint and stop after the current step."""

    def __init__(self):
        self.received: str | None = None
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def check_writable(run_dir: Path) -> None:
    """A one-line HerdError unless checkpoints can be written under ``run_dir`` (created if needed)."""
    try:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        probe = run_dir / "checkpoints" / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise HerdError(f"checkpoint directory {run_dir / 'checkpoints'} cannot be written: "
                        f"{e.strerror or e}") from None


class _NoProgress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_task(self, *args, **kwargs):
        return 0

    def update(self, *args, **kwargs):
        pass


def _progress(enabled: bool, console=None):
    if not enabled:
        return _NoProgress()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]:.3f}"), TimeRemainingColumn(), console=console,
                    transient=False)
