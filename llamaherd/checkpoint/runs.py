"""Training run directories: step checkpoints, each a loadable model plus what an exact resume needs.

    RUN/checkpoints/step_0000100/
        herd.json, model.safetensors, tokenizer.model   the model, in llamaherd's own layout (or, with
                                                         checkpoint.sharded, dcp/: every rank's shards)
        train_state.pt                                   optimizer, data loader position, RNG, step
        checksums.json                                   size + sha256 of every file above

Each checkpoint is written into a temporary directory and renamed into place when complete, so a
crash while saving leaves the previous checkpoints as they were. On resume the newest checkpoint
whose checksums verify is used; a corrupt or truncated one is reported and skipped.
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from llamaherd.errors import HerdError

STATE = "train_state.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """The run's checkpoint directories, newest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def latest_good(run_dir: Path, warn=None) -> Path | None:
    """The newest checkpoint that verifies; ``warn(message)`` hears about each one skipped."""
    from llamaherd.checkpoint.native import verify_checksums

    for ckpt in checkpoint_dirs(run_dir):
        try:
            verify_checksums(ckpt)
            if not (ckpt / STATE).is_file():
                raise HerdError(f"{ckpt / STATE}: missing")
            return ckpt
        except HerdError as e:
            (warn or (lambda m: print(m, file=sys.stderr)))(f"warning: skipping damaged checkpoint: {e}")
    return None


def step_dir(run_dir: Path, step: int) -> Path:
    """Where step ``step``'s checkpoint of the run in ``run_dir`` goes: ``checkpoints/step_NNNNNNN``."""
    return Path(run_dir) / "checkpoints" / f"step_{step:07d}"


def save_checkpoint(run_dir: Path, step: int, model, tokenizer, train_state: dict, keep: int,
                    params: dict[str, torch.Tensor] | None = None) -> Path:
    """Write step ``step``'s checkpoint atomically, then delete all but the newest ``keep``.

    ``train_state`` (anything ``torch.save`` writes) goes to ``train_state.pt``; the model's weights
    (``params``, whole tensors by name, or the model's own) and ``tokenizer`` to the herd layout beside it."""
    from llamaherd.checkpoint import native

    final = step_dir(run_dir, step)
    root = final.parent
    tmp = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
        torch.save(train_state, tmp / STATE)
        if params is None:
            params = {n: p.detach() for n, p in model.named_parameters()}  # a tied weight once
        elif model.args.tie_embeddings:
            params = {n: p for n, p in params.items() if n != "output.weight"}
        native.write(tmp, model.args, params, tokenizer, params["tok_embeddings.weight"].dtype)  # + checksums
        native.publish(tmp, final)
    except OSError as e:
        raise HerdError(f"cannot write checkpoint {final}: {e.strerror or e}; the previous checkpoints are "
                        "intact") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    for old in checkpoint_dirs(run_dir)[max(keep, 1):]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def sharded_tmp(run_dir: Path, step: int) -> Path:
    """Where every rank writes its shards of step ``step``'s sharded checkpoint before it is published."""
    final = step_dir(run_dir, step)
    return final.parent / f".{final.name}.tmp-sharded"


def publish_sharded(run_dir: Path, step: int, args, tokenizer, train_state: dict, dtype, keep: int) -> Path:
    """Complete a sharded checkpoint whose shards every rank has written (``sharded_tmp``): the train state,
    herd.json, the tokenizer and checksums.json beside them, then renamed into place; the oldest beyond
    ``keep`` deleted. On rank 0, after every rank's shards are complete."""
    from llamaherd.checkpoint import native

    final, tmp = step_dir(run_dir, step), sharded_tmp(run_dir, step)
    try:
        torch.save(train_state, tmp / STATE)
        native.write(tmp, args, None, tokenizer, dtype)
        native.publish(tmp, final)
    except OSError as e:
        raise HerdError(f"cannot write checkpoint {final}: {e.strerror or e}; the previous checkpoints are "
                        "intact") from None
    for old in checkpoint_dirs(run_dir)[max(keep, 1):]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_train_state(ckpt: Path) -> dict:
    try:
        return torch.load(Path(ckpt) / STATE, map_location="cpu", weights_only=False)
    except Exception as e:  # verified by checksum first, so this is a version mismatch or similar
        raise HerdError(f"{Path(ckpt) / STATE}: cannot be read ({type(e).__name__}: {e})") from None
