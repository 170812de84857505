"""The pretraining loop: read packed rows, step AdamW, log, evaluate, checkpoint, resume exactly.

    for step in start+1 .. steps:
        lr <- warmup + cosine schedule(step)
        for each of grad_accum micro-batches: loss(model(inputs, doc_ids), targets).backward()
        clip gradients; optimizer.step(); log; maybe evaluate; maybe checkpoint

Everything that decides the next step (weights, optimizer moments, loader position, RNG) is in the
checkpoint, so a run killed at any moment and started again ends bit-identical to one never stopped.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from llamaherd.config import RunConfig, dump_config, model_args
from llamaherd.errors import HerdError
from llamaherd.train import checkpointing
from llamaherd.train.metrics import MetricsLog, bits_per_byte, memory_gib, peak_flops
from llamaherd.train.parallel import prepare_model


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


def lr_at(step: int, cfg) -> float:
    """Linear warmup to cfg.lr over warmup_steps, then cosine decay to lr * min_lr_ratio at cfg.steps."""
    if step <= cfg.warmup_steps:
        return cfg.lr * step / max(cfg.warmup_steps, 1)
    progress = min(1.0, (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


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


def make_optimizer(model, cfg) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not on norm weights); the fused kernel on CPU and GPU."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = next(model.parameters()).device.type in ("cpu", "cuda")  # several times faster than foreach
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=fused)


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in nats over the targets that are not ignored (-100)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)


@torch.no_grad()
def evaluate(model, dataset, cfg, device, amp, max_batches: int | None) -> float:
    """Mean validation loss (nats per predicted token) over up to ``max_batches`` unshuffled batches."""
    from llamaherd.data.loader import iter_eval_batches

    model.eval()
    total, count = 0.0, 0
    for batch in iter_eval_batches(dataset, cfg.batch_size, cfg.seq_len, max_batches=max_batches):
        batch = batch.to(device)
        with amp():
            logits = model(batch.inputs, doc_ids=batch.doc_ids)
        n = int((batch.targets != -100).sum())
        if n:
            total += float(loss_fn(logits, batch.targets)) * n
            count += n
    model.train()
    if count == 0:
        raise HerdError("validation set has no tokens to predict")
    return total / count


def dataset_bytes(dataset, tokenizer) -> int:
    """UTF-8 bytes of the text behind a packed dataset (begin/end-of-text tokens excluded)."""
    specials = {dataset.bos_id, dataset.eos_id}
    total = 0
    for i in range(dataset.n_docs):
        ids = [t for t in dataset.doc(i).tolist() if t not in specials]
        total += len(tokenizer.decode_bytes(ids))
    return total


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


def _check_writable(run_dir: Path) -> None:
    try:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        probe = run_dir / "checkpoints" / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise HerdError(f"checkpoint directory {run_dir / 'checkpoints'} cannot be written: {e.strerror or e}") from None


def pretrain(cfg: RunConfig, run_dir: str | Path, *, progress: bool = True, console=None) -> TrainResult:
    """Train (or resume training) the model ``cfg`` describes; checkpoints and metrics go to ``run_dir``."""
    from llamaherd.checkpoint import load
    from llamaherd.data.loader import PackedLoader
    from llamaherd.data.pack import PackedDataset
    from llamaherd.model.args import flops_per_token
    from llamaherd.model.transformer import Transformer
    from llamaherd.tokenizer import Tokenizer

    run_dir = Path(run_dir)
    tcfg = cfg.train
    if tcfg.steps < 1 or tcfg.batch_size < 1 or tcfg.seq_len < 2 or tcfg.grad_accum < 1:
        raise HerdError("train: steps, batch_size and grad_accum must be >= 1 and seq_len >= 2")
    if not cfg.data.train_dir:
        raise HerdError("data.train_dir is not set: point it at a packed dataset (herd data pack)")
    tokenizer_path = Path(cfg.tokenizer.path) if cfg.tokenizer.path else run_dir / "tokenizer.model"
    tokenizer = Tokenizer.from_file(tokenizer_path)
    train_set = PackedDataset(cfg.data.train_dir)
    val_set = PackedDataset(cfg.data.val_dir) if cfg.data.val_dir else None
    for ds in filter(None, (train_set, val_set)):
        if ds.vocab_size != tokenizer.n_words:
            raise HerdError(f"{ds.path}: packed with a vocabulary of "
                            f"{ds.vocab_size} tokens but tokenizer {tokenizer_path} has {tokenizer.n_words}")
    args = model_args(cfg, vocab_size=tokenizer.n_words)
    if "vocab_size" in cfg.model.overrides and cfg.model.overrides["vocab_size"] < tokenizer.n_words:
        raise HerdError(f"model.vocab_size {cfg.model.overrides['vocab_size']} is smaller than tokenizer "
                        f"{tokenizer_path} ({tokenizer.n_words} tokens)")
    if tcfg.seq_len > args.max_seq_len:
        raise HerdError(f"train.seq_len {tcfg.seq_len} is longer than the model's max_seq_len {args.max_seq_len}")

    device = resolve_device(tcfg.device)
    amp_dtype = autocast_dtype(tcfg.dtype, device)
    amp = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else nullcontext
    _check_writable(run_dir)
    (run_dir / "config.toml").write_text(dump_config(cfg))

    # a fresh model, or the newest good checkpoint's
    def log(message: str) -> None:
        if console is None:
            print(message)
        else:
            console.print(message, soft_wrap=True, highlight=False, markup=False)

    ckpt = checkpointing.latest_good(run_dir, warn=log)
    loader = PackedLoader(train_set, tcfg.batch_size, tcfg.seq_len, seed=tcfg.seed)
    if ckpt is not None:
        state = checkpointing.load_train_state(ckpt)
        model, _ = load(ckpt, device=device, dtype=torch.float32, tokenizer=False)
        if model.args != args:
            raise HerdError(f"{ckpt}: was trained with different model settings than this recipe; use another --out")
        for p in model.parameters():
            p.requires_grad_(True)
        start = state["step"]
        loader.load_state_dict(state["loader"])
        torch.set_rng_state(state["rng_cpu"])
        if device.type == "cuda" and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(state["rng_cuda"], device)
    else:
        torch.manual_seed(tcfg.seed)
        with torch.device("meta"):
            model = Transformer(args)
        model.to_empty(device=device)
        if args.tie_embeddings:  # to_empty gives every module its own tensor: tie them again
            model.output.weight = model.tok_embeddings.weight
        model.init_rope(device)
        model.init_weights(seed=tcfg.seed)
        state, start = None, 0
    model.train()
    optimizer = make_optimizer(model, tcfg)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
    prepare_model(model, activation_checkpointing=tcfg.activation_checkpointing, compile=tcfg.compile)
    train_loss_fn = torch.compile(loss_fn) if tcfg.compile else loss_fn  # fuses the float32 upcast into the loss

    metrics = MetricsLog(run_dir / "metrics.jsonl", run_dir / "tensorboard" if tcfg.tensorboard else None)
    metrics.truncate_after(start)  # records past the checkpoint are redone, bit for bit
    if start >= tcfg.steps:
        log(f"{run_dir}: already trained to step {start} of {tcfg.steps}; nothing to do")
    elif start:
        log(f"resuming from {ckpt} (step {start})")
    tokens_per_step = tcfg.batch_size * tcfg.seq_len * tcfg.grad_accum
    flops_tok = flops_per_token(args, tcfg.seq_len)
    peak = peak_flops(device) if amp_dtype == torch.bfloat16 else None
    val_bytes = val_tokens = None
    if val_set is not None:
        val_bytes = dataset_bytes(val_set, tokenizer)
        val_tokens = val_set.n_tokens - val_set.n_docs  # predicted targets: every token but each document's first

    def save(step: int) -> Path:
        train_state = {"step": step, "optimizer": optimizer.state_dict(), "loader": loader.state_dict(),
                       "rng_cpu": torch.get_rng_state(),
                       "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
        return checkpointing.save_checkpoint(run_dir, step, model, tokenizer, train_state, cfg.checkpoint.keep)

    def validate(step: int) -> tuple[float, float | None]:
        val = evaluate(model, val_set, tcfg, device, amp, tcfg.eval_batches or None)
        bpb = bits_per_byte(val, val_tokens, val_bytes) if val_bytes else None
        metrics.write({"step": step, "val_loss": val, "val_bpb": bpb})
        return val, bpb

    train_loss = val_loss = val_bpb = None
    recent: list[float] = []  # the last log_every losses: the reported train loss is their mean
    last_ckpt = ckpt
    step, stopped_by = start, None
    t_run = time.perf_counter()
    t_log, tokens_since = time.perf_counter(), 0
    bar = _progress(progress, console)
    with _StopSignals() as stop, bar:
        task = bar.add_task("pretrain", total=tcfg.steps, completed=start, loss=float("nan"))
        while step < tcfg.steps:
            step += 1
            lr = lr_at(step, tcfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # summed on the device: one sync a step
            for _ in range(tcfg.grad_accum):
                batch = next(loader).to(device, non_blocking=True)
                with amp():
                    logits = model(batch.inputs, doc_ids=batch.doc_ids)
                loss = train_loss_fn(logits, batch.targets) / tcfg.grad_accum
                loss.backward()
                loss_sum += loss.detach()
            loss_sum = float(loss_sum)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            recent = (recent + [loss_sum])[-tcfg.log_every:]
            train_loss, tokens_since = sum(recent) / len(recent), tokens_since + tokens_per_step
            record = {"step": step, "loss": loss_sum, "grad_norm": grad_norm, "lr": lr}
            if step % tcfg.log_every == 0 or step == tcfg.steps:
                elapsed = time.perf_counter() - t_log
                tps = tokens_since / elapsed if elapsed > 0 else 0.0
                record.update(tokens_per_s=tps, memory_gib=memory_gib(device),
                              mfu=(tps * flops_tok / peak) if peak else None)
                t_log, tokens_since = time.perf_counter(), 0
            metrics.write(record)
            bar.update(task, completed=step, loss=loss_sum)
            if val_set is not None and tcfg.eval_every and (step % tcfg.eval_every == 0 or step == tcfg.steps):
                val_loss, val_bpb = validate(step)
            if stop.received or step == tcfg.steps or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0):
                last_ckpt = save(step)
            if stop.received:
                stopped_by = stop.received
                log(f"{stopped_by}: checkpoint written at step {step} ({last_ckpt}); run the same command to resume")
                break
    metrics.close()
    if step == start:  # nothing left to train: report what the log says
        records = metrics.read()
        losses = [r["loss"] for r in records if "loss" in r][-tcfg.log_every:]
        vals = [r for r in records if "val_loss" in r]
        train_loss = sum(losses) / len(losses) if losses else None
        if vals:
            val_loss, val_bpb = vals[-1]["val_loss"], vals[-1]["val_bpb"]
    elapsed = time.perf_counter() - t_run
    done = step - start
    return TrainResult(run_dir=run_dir, step=step, steps=tcfg.steps, resumed_from=start, stopped_by=stopped_by,
                       train_loss=train_loss if train_loss is not None else float("nan"),
                       val_loss=val_loss, val_bpb=val_bpb, tokens_seen=step * tokens_per_step,
                       tokens_per_s=done * tokens_per_step / elapsed if elapsed > 0 and done else 0.0,
                       checkpoint=last_ckpt)


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
