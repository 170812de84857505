"""The reward model: a Llama backbone with a scalar head, trained on preference pairs (Bradley-Terry).

    herd rm runs/tiny/sft --out runs/tiny/rm                 # the embedded preference pairs
    rm = load_reward_model("runs/tiny/rm/checkpoints/step_0000100")
    scores = rm.score(tokens, last)                          # [B]: one number per sequence

A sequence's score is the head applied to the backbone's final (normed) hidden state at its last token,
the end of the response. The loss is ``-log sigmoid(score(chosen) - score(rejected))`` without the margin
term (Llama 3 removed it). A checkpoint is the backbone as an ordinary model (``llamaherd.load`` reads it)
with the head's weight in its ``train_state.pt``; ``load_reward_model`` reads both.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from llamaherd.config import RunConfig, dump_config
from llamaherd.errors import HerdError
from llamaherd.posttrain.data import PairBatch, PairLoader, encode_pair, pair_eval_batches, ranked_pairs, to_preference
from llamaherd.posttrain.losses import reward_loss
from llamaherd.train.losses import LossOutput
from llamaherd.train.trainer import TrainResult, check_writable


class RewardModel(nn.Module):
    """``backbone`` (a Transformer) and ``head``, a linear map of its hidden state to one number."""

    head_key = "reward_head"  # where a checkpoint's train state keeps the head

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.args.dim, 1, bias=False, device=backbone.norm.weight.device)
        nn.init.zeros_(self.head.weight)  # every score 0 at first: the pairs start as coin flips

    @property
    def args(self):
        return self.backbone.args

    def score(self, tokens: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """tokens [B, S] (right-padded; causal attention, so padding after ``last`` changes nothing) -> [B]."""
        h = self.backbone(tokens, head=False)  # [B, S, dim]
        return self.head(h[torch.arange(len(last), device=h.device), last]).squeeze(-1).float()

    def forward(self, tokens: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        return self.score(tokens, last)


class RewardLoss:
    """Bradley-Terry loss over a PairBatch (chosen rows first); logs accuracy and the mean margin."""

    def __call__(self, model: RewardModel, batch: PairBatch) -> LossOutput:
        scores = model(batch.tokens, batch.last)
        b = len(batch.index)
        out = reward_loss(scores[:b], scores[b:])
        return LossOutput(out.loss, b, {"accuracy": out.accuracy, "margin": out.margin})


def load_reward_model(path: str | Path, device=None) -> RewardModel:
    """A reward model from a checkpoint written by ``herd rm`` (its backbone, and the head beside it)."""
    from llamaherd.checkpoint import load, runs

    path = Path(path)
    backbone, _ = load(path, device=device, dtype=torch.float32, tokenizer=False)
    state = runs.load_train_state(path)
    if "reward_head" not in state:
        raise HerdError(f"{path}: not a reward model checkpoint (no reward head in its train state)")
    rm = RewardModel(backbone)
    rm.head.weight.data.copy_(state["reward_head"])
    return rm.eval()


def load_pairs(paths: list[str], split: str, limit: int = 0, *, on_error=None) -> list[tuple[str, dict]]:
    """(where, pair) of the preference records in ``paths``, or of the embedded pairs' ``split``."""
    from llamaherd.posttrain.data import read_records

    out = []
    if paths:
        for path in paths:
            for where, record in read_records(path):
                try:
                    out.extend((where, p) for p in ranked_pairs(to_preference(record, where)))
                except HerdError as e:
                    if on_error is None:
                        raise
                    on_error(str(e))
    else:
        from llamaherd.posttrain.embedded import preference_pairs

        out = [(f"embedded {p['id']}", {k: p[k] for k in ("prompt", "chosen", "rejected")})
               for p in preference_pairs(split)]
    return out[:limit] if limit else out


def encode_pairs(chat, pairs: list[tuple[str, dict]], *, eot_loss: bool = True, on_error=None) -> list:
    out = []
    for where, pair in pairs:
        try:
            out.append(encode_pair(chat, pair, eot_loss=eot_loss, where=where))
        except HerdError as e:
            if on_error is None:
                raise
            on_error(str(e))
    return out


def pair_data(chat, pcfg, *, eot_loss: bool = True, console=None) -> tuple[list, list, int]:
    """(training pairs, held-out pairs, records skipped) as ``posttrain.*`` names them, tokenised; the first
    few skipped records are reported on ``console``."""
    skipped: list[str] = []
    pairs = encode_pairs(chat, load_pairs(pcfg.data, "train", pcfg.max_examples, on_error=skipped.append),
                         eot_loss=eot_loss, on_error=skipped.append)
    heldout = encode_pairs(chat, load_pairs(pcfg.eval_data, "val", pcfg.eval_examples), eot_loss=eot_loss)
    if console is not None:
        for message in skipped[:5]:
            console.print(f"[yellow]skipped[/] {message}")
    if not pairs:
        raise HerdError("no preference pairs to train on")
    return pairs, heldout, len(skipped)


@torch.no_grad()
def pair_margins(score_fn, batches) -> torch.Tensor:
    """[N]: each pair's chosen score minus its rejected one, ``score_fn(batch)`` [2B] giving the scores, in the
    pairs' order."""
    out = {}
    for batch in batches:
        s = score_fn(batch).double().cpu()
        b = len(batch.index)
        out.update(zip(batch.index.tolist(), s[:b] - s[b:], strict=True))
    return torch.stack([out[i] for i in sorted(out)]) if out else torch.zeros(0, dtype=torch.float64)


def margin_accuracy(margins: torch.Tensor) -> float:
    """Share of pairs whose chosen row scores above the rejected one (0 for no pairs)."""
    return int((margins > 0).sum()) / max(len(margins), 1)


def pair_accuracy(score_fn, batches) -> float:
    """Share of pairs whose chosen row ``score_fn(batch)`` [2B] rates above the rejected one."""
    return margin_accuracy(pair_margins(score_fn, batches))


def train_reward_model(base: str | Path, cfg: RunConfig, out_dir: str | Path, *, progress: bool = True,
                       console=None) -> tuple[TrainResult, float]:
    """Train a reward model from checkpoint ``base`` on ``posttrain.data`` pairs (default: the embedded ones)
    into ``out_dir``; (the training result, accuracy on the held-out pairs). Resumes a run there."""
    from llamaherd.posttrain.data import chat_format
    from llamaherd.posttrain.train import PostTrainer, start_from

    out_dir = Path(out_dir)
    tcfg, pcfg = cfg.train, cfg.posttrain
    if cfg.lora.rank:
        raise HerdError(f"lora.rank {cfg.lora.rank}: the reward model trains every weight; set lora.rank=0")
    check_writable(out_dir)
    torch.manual_seed(tcfg.seed)
    backbone, tokenizer = start_from(base, cfg)
    pairs, heldout, skipped = pair_data(chat_format(tokenizer), pcfg, console=console)
    (out_dir / "config.toml").write_text(dump_config(cfg))
    model = RewardModel(backbone)
    device = backbone.norm.weight.device
    loader = PairLoader(pairs, tcfg.seq_len, tcfg.batch_size, seed=tcfg.seed)
    eval_batches = pair_eval_batches(heldout, tcfg.seq_len, tcfg.batch_size)
    trainer = PostTrainer(model, RewardLoss(), loader, cfg, out_dir, tokenizer=tokenizer,
                          eval_data=lambda: eval_batches, name="reward model", progress=progress, console=console)
    trainer.resume()
    result = trainer.fit()
    model.eval()
    margins = pair_margins(lambda b: model(b.tokens.to(device), b.last.to(device)), eval_batches)
    accuracy = margin_accuracy(margins)
    # the Bradley-Terry loss on the held-out pairs: ln 2 = 0.693 for a model that prefers neither
    loss = float(torch.nn.functional.softplus(-margins).mean()) if len(margins) else None
    record = {"heldout_pair_accuracy": accuracy, "heldout_pair_loss": loss, "pairs": len(pairs),
              "heldout_pairs": len(heldout), "skipped": skipped, "checkpoint": str(result.checkpoint),
              "train_loss": result.train_loss, "val_loss": result.val_loss, "steps": result.steps}
    (out_dir / "rm_result.json").write_text(json.dumps(record, indent=2) + "\n")
    return result, accuracy
