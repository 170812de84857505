"""Pretraining: next-token prediction on packed tokens, through the shared Trainer.

    herd pretrain RECIPE --out runs/NAME   (or llamaherd.train.pretrain.pretrain(cfg, "runs/NAME"))

What is particular to pretraining is set up here: the tokenizer and the packed datasets a recipe
names (checked against each other), a fresh model built from the recipe's shape, the shuffled
rank-sharded loader, the validation pass and its bits per byte. The loop is ``Trainer.fit``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from llamaherd.config import RunConfig, dump_config, model_args
from llamaherd.errors import HerdError
from llamaherd.train.distributed import Distributed
from llamaherd.train.losses import NextTokenLoss
from llamaherd.train.parallel import ac_policy, build_model, check_float8, param_dtype
from llamaherd.train.trainer import Trainer, TrainResult, autocast_dtype, check_writable, resolve_device


def dataset_bytes(dataset, tokenizer) -> int:
    """UTF-8 bytes of the text behind a packed dataset (begin/end-of-text tokens excluded)."""
    specials = {dataset.bos_id, dataset.eos_id}
    total = 0
    for i in range(dataset.n_docs):
        ids = [t for t in dataset.doc(i).tolist() if t not in specials]
        total += len(tokenizer.decode_bytes(ids))
    return total


def pretrain(cfg: RunConfig, run_dir: str | Path, *, progress: bool = True, console=None) -> TrainResult:
    """Train (or resume training) the model ``cfg`` describes; checkpoints and metrics go to ``run_dir``."""
    from llamaherd.data.loader import PackedLoader, iter_eval_batches
    from llamaherd.data.pack import PackedDataset
    from llamaherd.tokenizer import Tokenizer

    run_dir = Path(run_dir)
    tcfg = cfg.train
    if tcfg.steps < 1 or tcfg.batch_size < 1 or tcfg.seq_len < 2 or tcfg.grad_accum < 1:
        raise HerdError("train: steps, batch_size and grad_accum must be >= 1 and seq_len >= 2")
    if tcfg.loss_chunk < 0:
        raise HerdError(f"train.loss_chunk {tcfg.loss_chunk}: expected 0 (the plain loss) or tokens per chunk >= 1")
    if tcfg.loss_chunk and (cfg.parallel.tp > 1 or cfg.parallel.pp > 1):
        raise HerdError(f"train.loss_chunk {tcfg.loss_chunk} with parallel.tp {cfg.parallel.tp} and parallel.pp "
                        f"{cfg.parallel.pp}: the chunked loss needs the whole output weight on one stage; expected "
                        "train.loss_chunk=0 (tensor parallel's loss parallel keeps the logits split instead)")
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
    autocast_dtype(tcfg.dtype, device)  # a bad train.dtype fails before anything is built
    param_dtype(tcfg.param_dtype)  # and a bad train.param_dtype
    ac_policy(tcfg.ac_policy)  # and a bad train.ac_policy
    check_float8(cfg)  # and train.float8 without torchao or with tensor parallel
    dist = Distributed.start(cfg, args, device)  # a bad layout fails here too, before any process group
    clean = False
    try:
        device = dist.device if dist.world > 1 else device
        if dist.is_main:
            check_writable(run_dir)
            (run_dir / "config.toml").write_text(dump_config(cfg))
        # train.batch_size rows per micro-batch in all: each data-parallel rank serves its share of them
        loader = PackedLoader(train_set, tcfg.batch_size // dist.dp_size, tcfg.seq_len, seed=tcfg.seed,
                              rank=dist.dp_rank, world_size=dist.dp_size)
        eval_data = eval_text = None
        if val_set is not None:
            def eval_data():
                return iter_eval_batches(val_set, tcfg.batch_size, tcfg.seq_len,
                                         max_batches=tcfg.eval_batches or None)

            # predicted targets: every token but each document's first
            eval_text = (val_set.n_tokens - val_set.n_docs, dataset_bytes(val_set, tokenizer))
        loss = NextTokenLoss(compile=tcfg.compile, chunk_size=tcfg.loss_chunk)
        trainer = Trainer(build_model(args, cfg, device, dist), loss, loader, cfg, run_dir, tokenizer=tokenizer,
                          eval_data=eval_data, eval_text=eval_text, name="pretrain", progress=progress,
                          console=console, dist=dist)
        trainer.resume()
        result = trainer.fit()
        if dist.is_main:
            write_result(result)
        clean = True
        return result
    finally:
        dist.close(clean)


def write_result(result: TrainResult) -> None:
    """``run_dir/train_result.json``: what a run ended with (how `herd run` hears of a torchrun it started)."""
    record = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(result).items()}
    (result.run_dir / "train_result.json").write_text(json.dumps(record, indent=2) + "\n")


def read_result(run_dir: Path) -> TrainResult:
    path = Path(run_dir) / "train_result.json"
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise HerdError(f"{path}: the training processes left no result ({e})") from None
    record["run_dir"] = Path(record["run_dir"])
    record["checkpoint"] = Path(record["checkpoint"]) if record["checkpoint"] else None
    return TrainResult(**record)


def check_layout(cfg: RunConfig, world: int) -> None:
    """A one-line error unless ``parallel.*`` can lay ``world`` processes out for this recipe's model, and unless
    ``train.ac_policy`` and ``train.float8`` can run: before torchrun starts N processes to fail alike."""
    from llamaherd.train.distributed import plan_layout

    if world < 1:
        raise HerdError(f"--nproc {world}: expected 1 or more processes")
    plan_layout(cfg.parallel, world, model_args(cfg), cfg.train.batch_size, cfg.train.seq_len)
    ac_policy(cfg.train.ac_policy)
    check_float8(cfg)


def launch(recipe: str | Path, overrides: list[str], out: str | Path, nproc: int, progress: bool = True) -> int:
    """Run ``herd pretrain RECIPE`` as ``nproc`` processes on this machine under torchrun; its exit status."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "llamaherd", "pretrain", str(recipe), *overrides, "--out", str(out)]
    if not progress:
        cmd.append("--no-progress")
    return subprocess.run(cmd).returncode
