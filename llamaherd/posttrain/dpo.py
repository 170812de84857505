"""Direct preference optimisation as Meta describes it for Llama 3.

    herd dpo runs/tiny/sft/checkpoints/step_0000150 --out runs/tiny/dpo
    result = dpo(base, cfg, out_dir)

The policy starts from ``base`` (usually the SFT model), which is also the frozen reference: its
log-probabilities of every training and held-out pair are computed once, before training, and kept in
``reference_logps.pt``. Llama 3's recipe: beta 0.1, learning rate 1e-5 (``recipes/dpo.toml``), the
formatting tokens (headers, ``<|eot_id|>``) masked out of both responses' log-probabilities, and an NLL term
with coefficient 0.2 on the chosen response (``posttrain.nll_alpha``).

Held-out preference accuracy: the share of held-out pairs whose chosen response the model gives a higher
log-probability than the rejected one (the ranking of the implicit reward beta * log pi(y|x) / pi_ref(y|x)
under a reference that prefers neither), for the starting model and for the trained one: one yardstick for
both. The implicit reward's accuracy against the actual reference (the starting model), TRL's
``rewards/accuracies``, is reported too: on the held-out pairs after training
(``heldout_implicit_reward_accuracy``; 0.5 is chance, the starting model's own rewards are all 0) and on
each training batch (``implicit_reward_accuracy``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from llamaherd.config import RunConfig, dump_config
from llamaherd.data.loader import IGNORE_INDEX
from llamaherd.errors import HerdError
from llamaherd.posttrain.data import PairBatch, PairLoader, chat_format, pair_eval_batches
from llamaherd.posttrain.losses import dpo_loss, dpo_nll_loss, mean_nll, token_logps
from llamaherd.posttrain.reward import pair_data
from llamaherd.posttrain.train import PostTrainer, start_from
from llamaherd.train.losses import LossOutput
from llamaherd.train.trainer import TrainResult, check_writable


def pair_logps(model, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence log-probabilities [2B] over the rows' loss tokens, per-token log-probabilities [2B, S])."""
    logits = model(batch.tokens)
    per_token = token_logps(logits, batch.targets)
    return per_token.sum(-1), per_token


@torch.no_grad()
def reference_logps(model, pairs: list, seq_len: int, batch_size: int) -> torch.Tensor:
    """[N, 2]: the (chosen, rejected) log-probabilities of every pair under ``model`` (the reference's are
    computed once, before training)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = torch.zeros(len(pairs), 2)
    for batch in pair_eval_batches(pairs, seq_len, batch_size):
        seq, _ = pair_logps(model, batch.to(device))
        b = len(batch.index)
        out[batch.index] = torch.stack([seq[:b], seq[b:]], dim=1).float().cpu()
    model.train(was_training)
    return out


class DPOLoss:
    """The DPO loss of a PairBatch against precomputed reference log-probabilities (``ref[index]``), plus
    ``nll_alpha`` times the chosen responses' mean NLL per token when ``nll_alpha`` > 0."""

    def __init__(self, ref: torch.Tensor, beta: float = 0.1, nll_alpha: float = 0.2):
        self.ref, self.beta, self.nll_alpha = ref, beta, nll_alpha

    def __call__(self, model, batch: PairBatch) -> LossOutput:
        seq, per_token = pair_logps(model, batch)
        b = len(batch.index)
        ref = self.ref.to(seq.device)[batch.index]
        if self.nll_alpha > 0:
            nll = mean_nll(per_token[:b], batch.targets[:b] != IGNORE_INDEX)
            out = dpo_nll_loss(seq[:b], seq[b:], ref[:, 0], ref[:, 1], nll, beta=self.beta, alpha=self.nll_alpha)
        else:
            out = dpo_loss(seq[:b], seq[b:], ref[:, 0], ref[:, 1], beta=self.beta)
        return LossOutput(out.loss, b, {"reward_margin": out.margin, "implicit_reward_accuracy": out.accuracy})


def preference_accuracy(logps: torch.Tensor) -> float:
    """Share of pairs whose chosen response has the higher of the two numbers in ``logps`` [N, 2]."""
    return int((logps[:, 0] > logps[:, 1]).sum()) / len(logps) if len(logps) else 0.0


def dpo(base: str | Path, cfg: RunConfig, out_dir: str | Path, *, progress: bool = True,
        console=None) -> tuple[TrainResult, dict]:
    """Train ``base`` with DPO on ``posttrain.data`` pairs (default: the embedded ones) into ``out_dir``;
    (the training result, its numbers: held-out preference accuracy before and after). Resumes a run there."""
    out_dir = Path(out_dir)
    tcfg, pcfg = cfg.train, cfg.posttrain
    check_writable(out_dir)
    torch.manual_seed(tcfg.seed)
    model, tokenizer = start_from(base, cfg)
    # DPO's log-probabilities: the responses' content only (the formatting tokens masked, eot included)
    pairs, heldout, skipped = pair_data(chat_format(tokenizer), pcfg, eot_loss=False, console=console)
    (out_dir / "config.toml").write_text(dump_config(cfg))
    eval_batches = pair_eval_batches(heldout, tcfg.seq_len, tcfg.batch_size)
    ref_path = out_dir / "reference_logps.pt"
    if ref_path.is_file():  # a resumed run: the reference is the same model, computed once
        ref = torch.load(ref_path)
    else:
        ref = reference_logps(model, pairs, tcfg.seq_len, tcfg.batch_size)
        torch.save(ref, ref_path)
    if ref.shape != (len(pairs), 2):
        raise HerdError(f"{ref_path}: holds {ref.shape[0]} pairs' reference log-probabilities, this run has "
                        f"{len(pairs)}; use another --out")
    heldout_ref = reference_logps(model, heldout, tcfg.seq_len, tcfg.batch_size)
    # held-out pairs look their reference up after the training pairs' (validation loss uses the same loss)
    ref = torch.cat([ref, heldout_ref])
    for batch in eval_batches:
        batch.index += len(pairs)
    loader = PairLoader(pairs, tcfg.seq_len, tcfg.batch_size, seed=tcfg.seed)
    trainer = PostTrainer(model, DPOLoss(ref, beta=pcfg.beta, nll_alpha=pcfg.nll_alpha), loader, cfg, out_dir,
                          tokenizer=tokenizer, eval_data=(lambda: eval_batches) if eval_batches else None,
                          name="dpo", progress=progress, console=console)
    trainer.resume()
    result = trainer.fit()
    heldout_after = reference_logps(model, heldout, tcfg.seq_len, tcfg.batch_size)
    numbers = {"heldout_pair_accuracy": preference_accuracy(heldout_after),
               "sft_heldout_pair_accuracy": preference_accuracy(heldout_ref),
               "heldout_implicit_reward_accuracy": preference_accuracy(heldout_after - heldout_ref),
               "pairs": len(pairs), "heldout_pairs": len(heldout), "skipped": skipped, "beta": pcfg.beta,
               "nll_alpha": pcfg.nll_alpha}
    record = {**numbers, "checkpoint": str(result.checkpoint), "train_loss": result.train_loss, "steps": result.steps}
    (out_dir / "dpo_result.json").write_text(json.dumps(record, indent=2) + "\n")
    return result, numbers
