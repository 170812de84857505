"""LoRA: low-rank adapters on the frozen linear layers of the Transformer (Hu et al. 2021, arXiv:2106.09685).

    >>> apply_lora(model, LoRAConfig(rank=8, targets=("wq", "wk", "wv", "wo")))  # only lora_A/lora_B train
    >>> ...                                                                       # train as usual
    >>> save_peft_adapter(model, "adapter")   # loads with peft.PeftModel.from_pretrained on the HF export
    >>> merge_lora(model)                     # an ordinary Transformer again, for checkpoint.save

A target layer y = W x becomes y = W x + (alpha / r) * B A dropout(x), with A [r, in] and B [out, r].
Initialised as in PEFT (A Kaiming-uniform, B zero), a fresh adapter leaves the model's output unchanged.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from llamaherd.checkpoint.hf import file_name, to_hf_rope
from llamaherd.checkpoint.native import publish, write_checksums, write_json, write_safetensors
from llamaherd.errors import HerdError
from llamaherd.model.args import ModelArgs

TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
_PARENT = {"wq": "attention", "wk": "attention", "wv": "attention", "wo": "attention",
           "w1": "feed_forward", "w2": "feed_forward", "w3": "feed_forward"}
HF_NAMES = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj",
            "w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0  # on the input of A, during training
    targets: tuple[str, ...] = ("wq", "wk", "wv", "wo")  # our names: wq wk wv wo w1 w2 w3

    def __post_init__(self) -> None:
        self.targets = tuple(self.targets)
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise HerdError(f"lora: rank must be an integer >= 1, got {self.rank!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise HerdError(f"lora: dropout must be in [0, 1), got {self.dropout!r}")
        if not self.targets:
            raise HerdError(f"lora: targets is empty; expected some of {', '.join(TARGETS)}")
        for t in self.targets:
            if t not in TARGETS:
                raise HerdError(f"lora: unknown target {t!r} in targets; expected some of {', '.join(TARGETS)}")


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` (``base``) plus a trainable low-rank update: base(x) + B(A(dropout(x))) * scaling."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if base.bias is not None:
            raise HerdError("lora: target layers must have no bias (Llama's linear layers have none)")
        self.base = base
        self.rank, self.scaling = rank, alpha / rank
        kw = dict(bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Linear(base.in_features, rank, **kw)
        self.lora_B = nn.Linear(rank, base.out_features, **kw)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as PEFT's default
        nn.init.zeros_(self.lora_B.weight)

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight, for code that reads a layer's weight (dtype, device, shape)."""
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W + scaling * B @ A, computed in float32, in the base weight's dtype."""
        w = self.base.weight
        delta = self.lora_B.weight.float() @ self.lora_A.weight.float()
        return (w.float() + self.scaling * delta).to(w.dtype)


def _lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> nn.Module:
    """Freeze every parameter of ``model`` and wrap each target layer in a LoRALinear, in place."""
    if _lora_layers(model):
        raise HerdError("lora: the model already has LoRA adapters (merge_lora first to add new ones)")
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in model.layers:
        for t in cfg.targets:
            parent = getattr(layer, _PARENT[t])
            setattr(parent, t, LoRALinear(getattr(parent, t), cfg.rank, cfg.alpha, cfg.dropout))
    model.lora_config = cfg
    return model


def trainable_parameters(model: nn.Module) -> int:
    """Parameters with requires_grad: after apply_lora, sum over targets and layers of r * (in + out)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _in_out(args: ModelArgs) -> dict[str, tuple[int, int]]:
    q, kv, hidden = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim, args.hidden_dim
    return {"wq": (args.dim, q), "wk": (args.dim, kv), "wv": (args.dim, kv), "wo": (q, args.dim),
            "w1": (args.dim, hidden), "w3": (args.dim, hidden), "w2": (hidden, args.dim)}


def lora_parameter_count(args: ModelArgs, cfg: LoRAConfig) -> int:
    """n_layers * sum over targets of r * (in + out), from the model's shape alone."""
    sizes = _in_out(args)
    return args.n_layers * sum(cfg.rank * sum(sizes[t]) for t in cfg.targets)


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace each LoRALinear by a plain nn.Linear holding W + scaling * B @ A, in place."""
    for name, lora in _lora_layers(model):
        parent_name, _, attr = name.rpartition(".")
        base = lora.base
        base.weight = nn.Parameter(lora.merged_weight(), requires_grad=base.weight.requires_grad)
        setattr(model.get_submodule(parent_name), attr, base)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors only, under our names (``layers.0.attention.wq.lora_A.weight``, ...)."""
    return {f"{name}.{ab}.weight": getattr(m, ab).weight.detach()
            for name, m in _lora_layers(model) for ab in ("lora_A", "lora_B")}


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Copy ``sd`` (from lora_state_dict) into the model's adapters; its names and shapes must match exactly."""
    own = lora_state_dict(model)
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    if missing or unexpected:
        what = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        raise HerdError(f"lora state dict does not fit the model: {what} "
                        f"({len(missing)} missing, {len(unexpected)} unexpected in all)")
    for name, t in sd.items():
        if t.shape != own[name].shape:
            raise HerdError(f"lora state dict: {name} has shape {list(t.shape)} but the model expects "
                            f"{list(own[name].shape)}")
        own[name].copy_(t)


def save_peft_adapter(model: nn.Module, out_dir, base_model_name_or_path: str = "") -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` as PEFT saves a LoRA on LlamaForCausalLM.

    ``peft.PeftModel.from_pretrained(hf_model, out_dir)`` then loads it onto the Hugging Face export of the
    base model. That export permutes the rows of wq and wk per head (``checkpoint.hf.to_hf_rope``); the rows
    of B @ A are the rows of B, so lora_B of wq/wk is permuted the same way and lora_A is left alone.
    The directory is written whole and renamed into place, with checksums.json.
    """
    layers = _lora_layers(model)
    if not layers:
        raise HerdError("lora: the model has no LoRA adapters to save (apply_lora first)")
    args, cfg = model.args, model.lora_config
    heads = {"wq": args.n_heads, "wk": args.n_kv_heads}
    tensors = {}
    for name, m in layers:  # name: layers.{i}.attention.wq
        prefix = "base_model.model." + file_name(f"{name}.weight").removesuffix(".weight")
        target = name.rpartition(".")[2]
        b = m.lora_B.weight.detach()
        tensors[f"{prefix}.lora_A.weight"] = m.lora_A.weight.detach()
        tensors[f"{prefix}.lora_B.weight"] = to_hf_rope(b, heads[target]) if target in heads else b
    alpha = int(cfg.alpha) if float(cfg.alpha).is_integer() else cfg.alpha
    config = {
        "base_model_name_or_path": base_model_name_or_path or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "lora_alpha": alpha,
        "lora_dropout": cfg.dropout,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": cfg.rank,
        "revision": None,
        "target_modules": sorted(HF_NAMES[t] for t in cfg.targets),
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": False,
    }

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise HerdError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / "adapter_config.json").is_file():
        raise HerdError(f"{out}: refusing to replace a non-empty directory that is not a PEFT adapter")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        sha = write_safetensors(tmp / "adapter_model.safetensors", tensors)
        write_json(tmp / "adapter_config.json", config)
        write_checksums(tmp, {"adapter_model.safetensors": sha})
        publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
