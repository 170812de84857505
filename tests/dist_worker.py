"""A torchrun worker for tests/test_distributed.py: train a few steps in a distributed layout, checkpoint, and
write the logits the distributed model gives on fixed tokens (gathered), to compare with the checkpoint's.

    torchrun --nproc-per-node N tests/dist_worker.py RUN_DIR STEPS key=value ...
"""

import sys
from pathlib import Path

import torch

from llamaherd.config import load_config, model_args
from llamaherd.data.loader import PackedLoader
from llamaherd.tokenizer import Tokenizer
from llamaherd.train.distributed import Distributed
from llamaherd.train.losses import NextTokenLoss
from llamaherd.train.parallel import build_model
from llamaherd.train.trainer import Trainer


def main() -> None:
    run_dir, steps, overrides = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    cfg = load_config("tiny", overrides)
    tok = Tokenizer.from_file(cfg.tokenizer.path)
    args = model_args(cfg, vocab_size=tok.n_words)
    dist = Distributed.start(cfg, args, torch.device("cpu"))
    loader = PackedLoader(cfg.data.train_dir, cfg.train.batch_size // dist.dp_size, cfg.train.seq_len,
                          seed=cfg.train.seed, rank=dist.dp_rank, world_size=dist.dp_size)
    trainer = Trainer(build_model(args, cfg, dist.device, dist), NextTokenLoss(), loader, cfg, run_dir,
                      tokenizer=tok, progress=False, dist=dist)
    for _ in range(steps):
        trainer.train_step()
    trainer.save()
    tokens = torch.arange(2 * cfg.train.seq_len).reshape(2, -1) % 251
    with torch.no_grad():
        logits = trainer.model(tokens)
    logits = logits.full_tensor() if hasattr(logits, "full_tensor") else logits
    if dist.is_main:
        torch.save({"tokens": tokens, "logits": logits}, run_dir / "logits.pt")
    dist.close()


if __name__ == "__main__":
    main()
