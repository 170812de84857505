"""The Trainer for post-training stages: the pretraining Trainer, with LoRA adapters in its checkpoints.

    model, tokenizer = start_from("runs/tiny", cfg)      # the base checkpoint, LoRA applied if cfg.lora.rank
    trainer = PostTrainer(model, loss, loader, cfg, "runs/tiny/sft", tokenizer=tokenizer, name="sft")
    trainer.resume(); trainer.fit()

Full fine-tuning needs nothing new. With LoRA the base weights stay frozen and only the adapters train;
a checkpoint then holds the *merged* weights as its model (what ``llamaherd.load`` gives: the fine-tuned
model), and the adapters and their optimizer moments in ``train_state.pt``. Resuming loads the base
again (from the stage's starting checkpoint) and the adapters from the checkpoint: bit-identical to a
run never stopped.
"""

from __future__ import annotations

from pathlib import Path

import torch

from llamaherd.config import RunConfig
from llamaherd.errors import HerdError
from llamaherd.train.trainer import Trainer, resolve_device


def start_from(base: str | Path, cfg: RunConfig):
    """(model, tokenizer): the checkpoint ``base`` on ``train.device`` in float32, with LoRA adapters when
    ``lora.rank`` > 0; a one-line error when the checkpoint has no tokenizer."""
    from llamaherd.checkpoint import load
    from llamaherd.posttrain.lora import LoRAConfig, apply_lora

    device = resolve_device(cfg.train.device)
    model, tokenizer = load(base, device=device, dtype=torch.float32)
    if tokenizer is None:
        raise HerdError(f"{base}: the checkpoint has no tokenizer (tokenizer.model): post-training needs one")
    if cfg.lora.rank > 0:
        apply_lora(model, LoRAConfig(rank=cfg.lora.rank, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                                     targets=tuple(cfg.lora.targets)))
    return model, tokenizer


def _is_lora(model) -> bool:
    from llamaherd.posttrain.lora import LoRALinear

    return any(isinstance(m, LoRALinear) for m in model.modules())


def merged_state_dict(model) -> dict[str, torch.Tensor]:
    """The weights of ``model`` with every LoRA adapter merged in, under a plain Transformer's names."""
    from llamaherd.posttrain.lora import LoRALinear

    merged = {f"{name}.weight": m.merged_weight().detach() for name, m in model.named_modules()
              if isinstance(m, LoRALinear)}
    plain = {k: v.detach() for k, v in model.state_dict().items()
             if ".lora_A." not in k and ".lora_B." not in k and not k.endswith(".base.weight")}
    return {**plain, **merged}


class PostTrainer(Trainer):
    """``Trainer`` whose checkpoints also work for a model with LoRA adapters (see the module docstring), and
    for a model with a ``backbone`` and a ``head`` (the reward model, PPO's policy with its value head): the
    backbone is the checkpoint's model, the head's weight goes in ``train_state.pt`` under the model's
    ``head_key``."""

    def state_dict(self) -> dict:
        if hasattr(self.model, "backbone"):
            state = super().state_dict()
            model = state["model"]
            state["model"] = {k.removeprefix("backbone."): v for k, v in model.items() if k.startswith("backbone.")}
            state[self.model.head_key] = model["head.weight"]
            return state
        if not _is_lora(self.model):
            return super().state_dict()
        from llamaherd.posttrain.lora import lora_state_dict

        return {"model": merged_state_dict(self.model), "optimizer": self.optimizer.state_dict(),
                "adapter": {k: v.detach().clone() for k, v in lora_state_dict(self.model).items()},
                **self.state_dict_extras()}

    def load_state_dict(self, state: dict) -> None:
        if hasattr(self.model, "backbone"):
            key = self.model.head_key
            if key not in state:
                raise HerdError(f"this checkpoint holds no {key.replace('_', ' ')}: it was written by another stage; "
                                "use another --out")
            model = {f"backbone.{k}": v for k, v in state["model"].items()}
            return super().load_state_dict({**state, "model": {**model, "head.weight": state[key]}})
        if not _is_lora(self.model):
            return super().load_state_dict(state)
        from llamaherd.posttrain.lora import load_lora_state_dict

        if "adapter" not in state:
            raise HerdError("this checkpoint holds no LoRA adapter: it was written by a run without LoRA; "
                            "use another --out or the same lora.* settings")
        load_lora_state_dict(self.model, state["adapter"])
        self.optimizer.load_state_dict(state["optimizer"])
        self._load_extras(state)

    def _load(self, ckpt: Path) -> None:
        if not _is_lora(self.model):
            return super()._load(ckpt)
        from llamaherd.checkpoint import runs

        self.load_state_dict(runs.load_train_state(ckpt))  # the base is loaded already; the merged weights unused
