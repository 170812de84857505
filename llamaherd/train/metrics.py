"""Throughput, MFU and memory; the metrics.jsonl log (and TensorBoard, when asked for)."""

from __future__ import annotations

import json
import math
import resource
import sys
from pathlib import Path

import torch

from llamaherd.errors import HerdError

# Peak dense bf16 FLOP/s by device name. An unknown device has no MFU: it is shown as unknown, never guessed.
PEAK_FLOPS: dict[str, float | None] = {
    "H100 PCIe": 756e12,
    "H100 NVL": None,  # a different peak we have not pinned down: no MFU rather than a wrong one
    "H100": 989e12,  # SXM / HBM3
    "H200": 989e12,
    "A100": 312e12,
}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_FLOPS.items():
        if key in name:
            return flops
    return None


def memory_gib(device: torch.device) -> float:
    """Peak memory: GPU memory allocated on CUDA, else the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**30 if sys.platform == "darwin" else rss / 2**20


def bits_per_byte(nats: float, n_tokens: int, n_bytes: int) -> float:
    """Mean loss in nats/token -> bits per byte of the underlying text."""
    return nats * n_tokens / (math.log(2) * n_bytes)


class MetricsLog:
    """Appends one JSON object per line; on resume, drops the records a checkpoint did not cover."""

    def __init__(self, path: Path, tensorboard_dir: Path | None = None):
        self.path = Path(path)
        self.tb = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise HerdError("train.tensorboard=true needs the tensorboard package "
                                "(pip install tensorboard)") from None
            self.tb = SummaryWriter(str(tensorboard_dir))

    def truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        tmp.replace(self.path)

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, record["step"])

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line]

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
