"""Post-training losses of Llama 3 as pure functions over tensors: no model runs here.

    token_logps, sequence_logps    log-probabilities of given tokens under logits
    mean_nll                       mean negative log-likelihood per masked token (DPO's NLL term)
    dpo_loss, dpo_nll_loss         DPO (sigmoid); DPO + 0.2 * NLL on the chosen responses (the Llama 3 recipe)
    reward_loss                    Bradley-Terry reward model loss without a margin term (the Llama 3 recipe)
    kl_rewards, gae, ppo_losses    PPO: KL-penalised rewards, advantages and returns, clipped objectives
    masked_mean, masked_whiten, entropy_from_logits

B is the batch, S or T the positions, V the vocabulary. ``targets[b, s]`` is the token ``logits[b, s]``
predicts (the caller shifts). Masks are bool, True on the positions that count. Everything is computed in
float32, whatever the dtype of the inputs.

References: TRL 1.16's DPOTrainer and RewardTrainer; for PPO, TRL 1.12's PPOTrainer
(trl/experimental/ppo/ppo_trainer.py), the last release of TRL that ships PPO.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from llamaherd.data.loader import IGNORE_INDEX

# ----------------------------------------------------------------------------- log-probabilities


def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] at each position, in float32: [B, S, V], [B, S] -> [B, S].
    Targets of -100 give 0."""
    flat = F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="none")
    return -flat.view(targets.shape)


def sequence_logps(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of the targets' log-probabilities over the positions where mask is True:
    [B, S, V], [B, S], [B, S] -> [B]."""
    return torch.where(mask, token_logps(logits, targets), 0.0).sum(dim=-1)


def mean_nll(logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood per masked token over the whole batch (not per row first):
    token log-probabilities [B, S], mask [B, S] -> scalar.

    Given the chosen responses' ``token_logps``, this is DPO's NLL term, as TRL 1.16 computes its
    ``loss_type="sft"`` term (trl/trainer/dpo_trainer.py, DPOTrainer._compute_loss):
    ``-chosen_per_token_logps[chosen_mask].mean()``."""
    return -masked_mean(logps.float(), mask)


# ----------------------------------------------------------------------------- DPO


@dataclass
class DPOOutput:
    """DPO's loss and metrics. A reward is beta * (policy - reference) log-probability of a response."""

    loss: torch.Tensor  # scalar to minimise: losses.mean(), plus alpha * nll for dpo_nll_loss
    losses: torch.Tensor  # [B] the DPO loss of each pair
    chosen_rewards: torch.Tensor  # [B] detached
    rejected_rewards: torch.Tensor  # [B] detached
    margin: torch.Tensor  # scalar: mean of chosen_rewards - rejected_rewards
    accuracy: torch.Tensor  # scalar: fraction of pairs with chosen_rewards > rejected_rewards
    nll: torch.Tensor | None = None  # scalar, detached: the NLL term before its coefficient (dpo_nll_loss)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1) -> DPOOutput:
    """The sigmoid DPO loss (Rafailov et al. 2023, arXiv:2305.18290) from sequence log-probabilities [B]:
    -logsigmoid(beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))), mean over pairs.
    As TRL 1.16's DPOTrainer with loss_type="sigmoid" and label_smoothing 0; beta 0.1 as in Llama 3."""
    chosen_logratios = policy_chosen.float() - ref_chosen.float()
    rejected_logratios = policy_rejected.float() - ref_rejected.float()
    losses = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return DPOOutput(
        loss=losses.mean(),
        losses=losses,
        chosen_rewards=chosen_rewards,
        rejected_rewards=rejected_rewards,
        margin=(chosen_rewards - rejected_rewards).mean(),
        accuracy=(chosen_rewards > rejected_rewards).float().mean(),
    )


def dpo_nll_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                 ref_rejected: torch.Tensor, chosen_nll: torch.Tensor, beta: float = 0.1,
                 alpha: float = 0.2) -> DPOOutput:
    """Llama 3's DPO: dpo_loss(...).loss + alpha * chosen_nll, where chosen_nll is ``mean_nll`` of the
    policy's token log-probabilities on the chosen responses (a scalar with gradient).

    TRL 1.16 spells this loss_type=["sigmoid", "sft"], loss_weights=[1.0, alpha] (the older rpo_alpha)."""
    out = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    return replace(out, loss=out.loss + alpha * chosen_nll, nll=chosen_nll.detach())


# ----------------------------------------------------------------------------- reward model


@dataclass
class RewardOutput:
    """The reward model's loss and metrics over a batch of preference pairs."""

    loss: torch.Tensor  # scalar: mean of -logsigmoid(chosen - rejected)
    accuracy: torch.Tensor  # scalar: fraction of pairs with chosen > rejected
    margin: torch.Tensor  # scalar: mean of chosen - rejected, detached


def reward_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> RewardOutput:
    """Bradley-Terry loss of a reward model's scores [B] for the chosen and the rejected responses.
    No margin term: Llama 3 removes it. As TRL 1.16's RewardTrainer.compute_loss without "margin"."""
    chosen, rejected = chosen_scores.float(), rejected_scores.float()
    return RewardOutput(
        loss=-F.logsigmoid(chosen - rejected).mean(),
        accuracy=(chosen > rejected).float().mean(),
        margin=(chosen - rejected).detach().mean(),
    )


# ----------------------------------------------------------------------------- PPO
# TRL 1.12 trl/experimental/ppo/ppo_trainer.py uses two masks: the policy's tokens, and the value's, one
# token longer (its "padding_mask_p1"). Here one mask serves both: the response tokens the policy generated.


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over the positions where mask is True: any shape, same shape -> scalar."""
    return torch.where(mask, x, 0.0).sum() / mask.sum()


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / sqrt(var + 1e-8) with the mean and the unbiased variance over the masked positions, as
    TRL's masked_whiten; shift_mean=False adds the mean back. Same shape as x; all positions are transformed."""
    n = mask.sum()
    if n < 2:
        raise ValueError(f"masked_whiten needs at least 2 masked values for an unbiased variance, got {int(n)}")
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask) * (n / (n - 1))  # Bessel's correction, as TRL
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of softmax(logits) at each position, in float32: [B, T, V] -> [B, T]."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


@torch.no_grad()
def kl_rewards(score: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
               kl_coef: float) -> torch.Tensor:
    """Per-token PPO rewards [B, T]: -kl_coef * (logprobs - ref_logprobs) on each response token (TRL's "k1"
    estimator of the KL to the reference), plus the reward model's score [B] on each row's last response token.
    logprobs, ref_logprobs, mask: [B, T]. Zero off the mask. TRL's PPOConfig default kl_coef is 0.05."""
    rewards = torch.where(mask, -kl_coef * (logprobs.float() - ref_logprobs.float()), 0.0)
    positions = torch.arange(mask.size(1), device=mask.device)
    last = torch.where(mask, positions, -1).amax(dim=1)  # [B] each row's last response token; -1 if it has none
    rows = torch.arange(mask.size(0), device=mask.device)
    rewards[rows, last.clamp(min=0)] += torch.where(last >= 0, score.float(), 0.0)
    return rewards


@torch.no_grad()
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2015, arXiv:1506.02438) backwards over the T tokens:
    rewards, values, mask [B, T] -> (advantages, returns), each [B, T].

    Rewards and values off the mask count as 0 (so is the value after the last token). returns = advantages
    + values, before the advantages are whitened over the mask; the advantages are then 0 off the mask.
    As TRL 1.12's PPOTrainer.train, with its defaults gamma 1.0 and lam 0.95."""
    rewards = torch.where(mask, rewards.float(), 0.0)
    values = torch.where(mask, values.float(), 0.0)
    T = rewards.size(1)
    advantages = torch.zeros_like(rewards)
    lastgaelam = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_values = values[:, t + 1] if t < T - 1 else 0.0
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages[:, t] = lastgaelam
    returns = advantages + values
    advantages = masked_whiten(advantages, mask).masked_fill(~mask, 0.0)
    return advantages, returns


@dataclass
class PPOOutput:
    """PPO's loss on a minibatch of response tokens, its two parts and their diagnostics (masked means)."""

    loss: torch.Tensor  # scalar to minimise: policy_loss + vf_coef * value_loss
    policy_loss: torch.Tensor  # scalar: the clipped surrogate, negated
    value_loss: torch.Tensor  # scalar: 0.5 * the clipped squared error of the values
    clipfrac: torch.Tensor  # scalar: fraction of tokens where the clipped policy branch is taken
    value_clipfrac: torch.Tensor  # scalar: fraction of tokens where the clipped value branch is taken
    approx_kl: torch.Tensor  # scalar: mean of 0.5 * (logprobs - old_logprobs)^2, detached
    ratio: torch.Tensor  # scalar: mean of exp(logprobs - old_logprobs), detached


def ppo_losses(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, values: torch.Tensor,
               old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, cliprange: float = 0.2,
               cliprange_value: float = 0.2, vf_coef: float = 0.1) -> PPOOutput:
    """PPO's clipped objectives (Schulman et al. 2017, arXiv:1707.06347) over the response tokens, all [B, T]:
    logprobs and values from the model being trained; old_logprobs, old_values, advantages and returns from
    the rollout. As TRL 1.12's PPOTrainer.train, with its PPOConfig defaults (cliprange 0.2, cliprange_value
    0.2, vf_coef 0.1). Positions off the mask must still hold finite numbers."""
    logprobs, old_logprobs, advantages = logprobs.float(), old_logprobs.float(), advantages.float()
    values, old_values, returns = values.float(), old_values.float(), returns.float()

    values_clipped = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    vf_losses1 = (values - returns) ** 2
    vf_losses2 = (values_clipped - returns) ** 2
    value_loss = 0.5 * masked_mean(torch.max(vf_losses1, vf_losses2), mask)

    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    policy_loss = masked_mean(torch.max(pg_losses1, pg_losses2), mask)

    with torch.no_grad():
        clipfrac = masked_mean((pg_losses2 > pg_losses1).float(), mask)
        value_clipfrac = masked_mean((vf_losses2 > vf_losses1).float(), mask)
        approx_kl = 0.5 * masked_mean(log_ratio**2, mask)
        mean_ratio = masked_mean(ratio, mask)
    return PPOOutput(
        loss=policy_loss + vf_coef * value_loss,
        policy_loss=policy_loss,
        value_loss=value_loss,
        clipfrac=clipfrac,
        value_clipfrac=value_clipfrac,
        approx_kl=approx_kl,
        ratio=mean_ratio,
    )
