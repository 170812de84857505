"""Post-training losses: hand-computed cases, and parity with TRL on the same inputs.

TRL 1.16 is the reference for DPO and the reward model: its own DPOTrainer._compute_loss and
RewardTrainer.compute_loss run here on a stub ``self``. TRL 1.16 no longer ships PPO; its last release that
does is TRL 1.12, whose formulas (trl/experimental/ppo/ppo_trainer.py) are restated below, verbatim but for
names, and compared against.
"""

import math
import statistics
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import trl  # noqa: F401  (a dev dependency: a missing install fails here, it does not skip)
from transformers import LlamaConfig, LlamaForCausalLM
from trl.trainer.dpo_trainer import DPOTrainer
from trl.trainer.reward_trainer import RewardTrainer
from trl.trainer.utils import add_fused_lm_head, selective_log_softmax
from trl.trainer.utils import entropy_from_logits as trl_entropy_from_logits

from llamaherd.posttrain.losses import (
    dpo_loss,
    dpo_nll_loss,
    entropy_from_logits,
    gae,
    kl_rewards,
    masked_mean,
    masked_whiten,
    mean_nll,
    ppo_losses,
    reward_loss,
    sequence_logps,
    token_logps,
)

ATOL = 1e-6  # float32, same operations in the same order
ATOL_MODEL = 1e-5  # float32 through a model: TRL's chunked fused LM head against a plain forward


def close(actual, expected, atol=ATOL):
    actual = actual.item() if isinstance(actual, torch.Tensor) else actual
    return math.isclose(actual, expected, rel_tol=0.0, abs_tol=atol)


def log1p_exp_neg(z: float) -> float:
    """-log(sigmoid(z)), by hand."""
    return -math.log(1.0 / (1.0 + math.exp(-z)))


# ----------------------------------------------------------------------------- log-probabilities


def test_sequence_logps_sums_the_masked_log_softmax_in_float32_and_minus_100_gives_0():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 7).to(torch.bfloat16)
    targets = torch.randint(0, 7, (2, 4))
    targets[1, 2] = -100
    mask = torch.tensor([[True, True, False, True], [False, True, True, True]])

    per_token = token_logps(logits, targets)
    got = sequence_logps(logits, targets, mask)
    assert per_token.dtype == got.dtype == torch.float32
    assert per_token[1, 2].item() == 0.0

    for b in range(2):  # log softmax by hand, in float64, over the bf16 values
        total = 0.0
        for s in range(4):
            row = [float(x) for x in logits[b, s].float()]
            if targets[b, s] == -100:
                continue
            logp = row[targets[b, s]] - math.log(sum(math.exp(x) for x in row))
            assert close(per_token[b, s], logp, 1e-5)
            if mask[b, s]:
                total += logp
        assert close(got[b], total, 1e-5)


def test_token_logps_match_trl_selective_log_softmax():
    torch.manual_seed(1)
    logits = torch.randn(3, 5, 11)
    targets = torch.randint(0, 11, (3, 5))
    torch.testing.assert_close(token_logps(logits, targets), selective_log_softmax(logits, targets),
                               atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------- DPO


def test_dpo_loss_by_hand():
    # pairs (policy chosen, policy rejected, ref chosen, ref rejected)
    pairs = [(-10.0, -12.0, -11.0, -11.5), (-5.0, -3.0, -5.5, -4.0), (-5.0, -4.0, -5.5, -4.5)]
    pc, pr, rc, rr = (torch.tensor(column) for column in zip(*pairs))
    out = dpo_loss(pc, pr, rc, rr, beta=0.1)

    losses = [log1p_exp_neg(0.1 * ((a - c) - (b - d))) for a, b, c, d in pairs]
    for got, want in zip(out.losses, losses):
        assert close(got, want)
    assert close(out.loss, sum(losses) / 3)
    chosen = [0.1 * (a - c) for a, _, c, _ in pairs]  # 0.1, 0.05, 0.05
    rejected = [0.1 * (b - d) for _, b, _, d in pairs]  # -0.05, 0.1, 0.05
    assert all(close(g, w) for g, w in zip(out.chosen_rewards, chosen))
    assert all(close(g, w) for g, w in zip(out.rejected_rewards, rejected))
    assert close(out.margin, ((0.1 + 0.05) + (0.05 - 0.1) + 0.0) / 3)
    assert close(out.accuracy, 1 / 3)  # the second pair prefers the rejected response; a tie is not a win
    assert out.nll is None


def test_dpo_nll_loss_adds_alpha_times_the_mean_nll_per_chosen_token():
    pc, pr = torch.tensor([-10.0, -5.0]), torch.tensor([-12.0, -3.0])  # policy chosen, policy rejected
    rc, rr = torch.tensor([-11.0, -5.5]), torch.tensor([-11.5, -4.0])  # reference chosen, reference rejected
    chosen_token_logps = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -7.0, -7.0]], requires_grad=True)
    chosen_mask = torch.tensor([[True, True, True], [True, False, False]])

    nll = mean_nll(chosen_token_logps, chosen_mask)
    assert close(nll, (1.0 + 2.0 + 0.5 + 3.0) / 4)  # a mean over the batch's tokens, not of per-row means
    out = dpo_nll_loss(pc, pr, rc, rr, nll)  # beta 0.1 and alpha 0.2 by default, as in Llama 3
    plain = dpo_loss(pc, pr, rc, rr)
    assert close(out.loss, plain.loss.item() + 0.2 * 1.625)
    torch.testing.assert_close(out.losses, plain.losses, atol=0, rtol=0)
    assert close(out.nll, 1.625)

    out.loss.backward()  # the NLL term's gradient reaches every masked chosen token, and only those
    expected = torch.where(chosen_mask, -0.2 / 4, 0.0)
    torch.testing.assert_close(chosen_token_logps.grad, expected, atol=ATOL, rtol=0)


def tiny_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    return LlamaForCausalLM(config)


def identity(x):
    return x


def stub_accelerator():
    return SimpleNamespace(device=torch.device("cpu"), gather=identity, gather_for_metrics=identity)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers: is_gradient_checkpointing is deprecated
@pytest.mark.parametrize("loss_types, loss_weights", [(["sigmoid"], [1.0]), (["sigmoid", "sft"], [1.0, 0.2])],
                         ids=["dpo", "dpo+0.2nll"])
def test_dpo_matches_trl_dpo_trainer(loss_types, loss_weights):
    """TRL 1.16 trl/trainer/dpo_trainer.py, DPOTrainer._compute_loss, run on a stub self with two tiny random
    Llamas: the loss, its gradient and the reward metrics. ["sigmoid", "sft"] with weights [1, 0.2] is
    Llama 3's DPO + 0.2 NLL (TRL's former rpo_alpha)."""
    policy, ref = tiny_llama(0), tiny_llama(1).eval()
    add_fused_lm_head(policy, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))  # as DPOTrainer does
    add_fused_lm_head(ref)
    B, S = 3, 10  # rows are [chosen; rejected], right-padded
    torch.manual_seed(2)
    input_ids = torch.randint(0, 32, (2 * B, S))
    attention_mask = torch.ones(2 * B, S, dtype=torch.long)
    completion_mask = torch.zeros(2 * B, S, dtype=torch.long)
    for row, (prompt, end) in enumerate([(3, 10), (2, 7), (4, 9), (3, 6), (2, 10), (4, 8)]):
        completion_mask[row, prompt:end] = 1
        attention_mask[row, end:] = 0
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}
    trl_self = SimpleNamespace(
        model=policy, ref_model=ref, accelerator=stub_accelerator(), beta=0.1, loss_types=loss_types,
        loss_weights=loss_weights, label_smoothing=0.0, f_divergence_type="reverse_kl", ld_alpha=None,
        use_weighting=False, aux_loss_enabled=False, precompute_ref_logps=False,
        args=SimpleNamespace(gradient_checkpointing_kwargs=None),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )
    trl_loss = DPOTrainer._compute_loss(trl_self, policy, dict(inputs), return_outputs=False)
    trl_loss.backward()
    trl_grads = [p.grad.clone() for p in policy.parameters()]
    policy.zero_grad()

    # ours: plain forwards, then the pure functions (targets shifted by the caller)
    targets, mask = input_ids[:, 1:], completion_mask[:, 1:].bool()
    logits = policy(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    with torch.no_grad():
        ref_logits = ref(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    policy_chosen, policy_rejected = sequence_logps(logits, targets, mask).chunk(2)
    ref_chosen, ref_rejected = sequence_logps(ref_logits, targets, mask).chunk(2)
    if "sft" in loss_types:
        nll = mean_nll(token_logps(logits[:B], targets[:B]), mask[:B])
        out = dpo_nll_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, nll, beta=0.1, alpha=0.2)
    else:
        out = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1)
    out.loss.backward()

    assert close(out.loss, trl_loss.item(), ATOL_MODEL)
    for ours, theirs in zip(policy.parameters(), trl_grads):
        torch.testing.assert_close(ours.grad, theirs, atol=ATOL_MODEL, rtol=1e-4)
    metrics = trl_self._metrics["train"]
    assert close(out.chosen_rewards.mean(), metrics["rewards/chosen"][0], ATOL_MODEL)
    assert close(out.rejected_rewards.mean(), metrics["rewards/rejected"][0], ATOL_MODEL)
    assert close(out.margin, metrics["rewards/margins"][0], ATOL_MODEL)
    assert close(out.accuracy, metrics["rewards/accuracies"][0])
    assert close(policy_chosen.mean(), metrics["logps/chosen"][0], ATOL_MODEL)


# ----------------------------------------------------------------------------- reward model


def test_reward_loss_by_hand():
    chosen, rejected = [1.0, 0.0, 2.0, 0.7], [0.5, 1.0, 2.5, 0.7]
    out = reward_loss(torch.tensor(chosen), torch.tensor(rejected))
    diffs = [c - r for c, r in zip(chosen, rejected)]  # 0.5, -1, -0.5, 0: no margin is subtracted
    assert close(out.loss, sum(log1p_exp_neg(d) for d in diffs) / 4)
    assert close(out.accuracy, 1 / 4)  # a tie is not a win
    assert close(out.margin, sum(diffs) / 4)


def test_reward_loss_matches_trl_reward_trainer():
    """TRL 1.16 trl/trainer/reward_trainer.py, RewardTrainer.compute_loss, on a stub self and a stub model
    that returns given scores as its [2B, 1] logits (rows [chosen; rejected]); no margin column."""
    torch.manual_seed(3)
    scores = torch.randn(2 * 8, requires_grad=True)
    trl_self = SimpleNamespace(
        model=SimpleNamespace(training=True), args=SimpleNamespace(center_rewards_coefficient=None),
        accelerator=stub_accelerator(), _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1,
    )
    model = lambda **inputs: SimpleNamespace(logits=scores[:, None])
    inputs = {"attention_mask": torch.ones(2 * 8, 4, dtype=torch.long)}
    trl_loss = RewardTrainer.compute_loss(trl_self, model, inputs)
    (trl_grad,) = torch.autograd.grad(trl_loss, scores)

    chosen, rejected = scores.chunk(2)
    out = reward_loss(chosen, rejected)
    (grad,) = torch.autograd.grad(out.loss, scores)
    assert close(out.loss, trl_loss.item())
    torch.testing.assert_close(grad, trl_grad, atol=ATOL, rtol=0)
    assert close(out.accuracy, trl_self._metrics["train"]["accuracy"][0])
    assert close(out.margin, trl_self._metrics["train"]["margin"][0])


# ----------------------------------------------------------------------------- PPO: TRL 1.12, restated
# From TRL 1.12.0 trl/experimental/ppo/ppo_trainer.py (module level): masked_mean, masked_var, masked_whiten.


def trl_masked_mean(values, mask, axis=None):
    if axis is not None:
        return (values * mask).sum(axis=axis) / mask.sum(axis=axis)
    else:
        return (values * mask).sum() / mask.sum()


def trl_masked_var(values, mask, unbiased=True):
    mean = trl_masked_mean(values, mask)
    centered_values = values - mean
    variance = trl_masked_mean(centered_values**2, mask)
    if unbiased:
        mask_sum = mask.sum()
        bessel_correction = mask_sum / (mask_sum - 1)
        variance = variance * bessel_correction
    return variance


def trl_masked_whiten(values, mask, shift_mean=True):
    mean, var = trl_masked_mean(values, mask), trl_masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened += mean
    return whitened


INVALID_LOGPROB = 1.0  # TRL 1.12 ppo_trainer.py: what it writes into the log-probabilities of padding
TRL_PPO_CONFIG = dict(kl_coef=0.05, cliprange=0.2, vf_coef=0.1, cliprange_value=0.2, gamma=1.0, lam=0.95)  # defaults


def trl_rollout(scores, logprobs, ref_logprobs, values, sequence_lengths, kl_coef, gamma, lam):
    """TRL 1.12 ppo_trainer.py, PPOTrainer.train: from the padding masks to step 6 (advantages and returns),
    with kl_estimator "k1" and whiten_rewards False, the defaults."""
    response_idxs = torch.arange(logprobs.shape[1]).repeat(logprobs.shape[0], 1)
    padding_mask = response_idxs > sequence_lengths.unsqueeze(1)
    logprobs = torch.masked_fill(logprobs, padding_mask, INVALID_LOGPROB)
    ref_logprobs = torch.masked_fill(ref_logprobs, padding_mask, INVALID_LOGPROB)
    sequence_lengths_p1 = sequence_lengths + 1
    padding_mask_p1 = response_idxs > (sequence_lengths_p1.unsqueeze(1))
    values = torch.masked_fill(values, padding_mask_p1, 0)

    logr = ref_logprobs - logprobs
    kl = -logr
    non_score_reward = -kl_coef * kl
    rewards = non_score_reward.clone()
    actual_start = torch.arange(rewards.size(0))
    actual_end = torch.where(sequence_lengths_p1 < rewards.size(1), sequence_lengths_p1, sequence_lengths)
    rewards[actual_start, actual_end] += scores

    lastgaelam = 0
    advantages_reversed = []
    gen_length = logprobs.shape[1]
    for t in reversed(range(gen_length)):
        nextvalues = values[:, t + 1] if t < gen_length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], axis=1)
    returns = advantages + values
    raw_advantages = advantages
    advantages = trl_masked_whiten(advantages, ~padding_mask)
    advantages = torch.masked_fill(advantages, padding_mask, 0)
    return SimpleNamespace(logprobs=logprobs, ref_logprobs=ref_logprobs, values=values, rewards=rewards,
                           raw_advantages=raw_advantages, advantages=advantages, returns=returns,
                           padding_mask=padding_mask, padding_mask_p1=padding_mask_p1)


def trl_ppo_losses(new_logprobs, mb_logprobs, mb_advantage, vpred, mb_values, mb_return, padding_mask,
                   padding_mask_p1, cliprange, cliprange_value, vf_coef):
    """TRL 1.12 ppo_trainer.py, PPOTrainer.train: the loss of one micro-batch, and its statistics."""
    vpredclipped = torch.clamp(vpred, mb_values - cliprange_value, mb_values + cliprange_value)
    vf_losses1 = torch.square(vpred - mb_return)
    vf_losses2 = torch.square(vpredclipped - mb_return)
    vf_loss_max = torch.max(vf_losses1, vf_losses2)
    vf_loss = 0.5 * trl_masked_mean(vf_loss_max, ~padding_mask_p1)
    vf_clipfrac = trl_masked_mean((vf_losses2 > vf_losses1).float(), ~padding_mask_p1)
    logprobs_diff = new_logprobs - mb_logprobs
    ratio = torch.exp(logprobs_diff)
    pg_losses = -mb_advantage * ratio
    pg_losses2 = -mb_advantage * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss_max = torch.max(pg_losses, pg_losses2)
    pg_loss = trl_masked_mean(pg_loss_max, ~padding_mask)
    loss = pg_loss + vf_coef * vf_loss
    pg_clipfrac = trl_masked_mean((pg_losses2 > pg_losses).float(), ~padding_mask)
    approxkl = 0.5 * (logprobs_diff**2).mean()
    return SimpleNamespace(loss=loss, pg_loss=pg_loss, vf_loss=vf_loss, pg_clipfrac=pg_clipfrac,
                           vf_clipfrac=vf_clipfrac, approxkl=approxkl)


# ----------------------------------------------------------------------------- PPO


def test_masked_mean_and_whiten_match_trl_and_use_the_unbiased_variance():
    torch.manual_seed(4)
    x = torch.randn(4, 6) * 3 + 1
    mask = torch.rand(4, 6) > 0.4
    assert close(masked_mean(x, mask), trl_masked_mean(x, mask).item())
    for shift_mean in (True, False):
        torch.testing.assert_close(masked_whiten(x, mask, shift_mean), trl_masked_whiten(x, mask, shift_mean),
                                   atol=ATOL, rtol=0)

    whitened = masked_whiten(x, mask)[mask].tolist()  # mean 0, and sample (n - 1) standard deviation 1
    assert close(statistics.fmean(whitened), 0.0, 1e-6)
    assert close(statistics.stdev(whitened), 1.0, 1e-5)
    with pytest.raises(ValueError, match="at least 2"):
        masked_whiten(x[:1, :1], torch.ones(1, 1, dtype=torch.bool))  # one value: no variance


def test_entropy_matches_trl_and_is_log_v_for_uniform_logits():
    torch.manual_seed(5)
    logits = torch.randn(2, 3, 17) * 2
    torch.testing.assert_close(entropy_from_logits(logits), trl_entropy_from_logits(logits), atol=ATOL, rtol=0)
    # TRL 1.12 PPOTrainer.train's own formula, inline there
    prob_dist = torch.nn.functional.softmax(logits, dim=-1)
    trl_ppo_entropy = torch.logsumexp(logits, dim=-1) - torch.sum(prob_dist * logits, dim=-1)
    torch.testing.assert_close(entropy_from_logits(logits), trl_ppo_entropy, atol=1e-5, rtol=0)

    uniform = entropy_from_logits(torch.full((1, 2, 17), 0.3, dtype=torch.bfloat16))
    assert uniform.dtype == torch.float32
    assert all(close(h, math.log(17), 1e-5) for h in uniform.flatten())


def test_kl_rewards_by_hand():
    logprobs = torch.tensor([[-1.0, -2.0, 4.0], [-0.5, -0.5, -3.0], [-1.0, -1.0, -1.0]])
    ref_logprobs = torch.tensor([[-1.5, -1.0, 0.0], [-0.5, -1.5, -2.0], [-2.0, -2.0, -2.0]])
    mask = torch.tensor([[True, True, False], [True, True, True], [False, False, False]])
    score = torch.tensor([2.0, -1.0, 5.0])
    rewards = kl_rewards(score, logprobs, ref_logprobs, mask, kl_coef=0.1)
    expected = torch.tensor([
        [-0.1 * 0.5, -0.1 * -1.0 + 2.0, 0.0],  # the score on the last response token; nothing off the mask
        [0.0, -0.1 * 1.0, -0.1 * -1.0 - 1.0],
        [0.0, 0.0, 0.0],  # a row without response tokens gets no score
    ])
    torch.testing.assert_close(rewards, expected, atol=ATOL, rtol=0)


def test_gae_by_hand():
    gamma, lam = 0.9, 0.8
    r, v = [0.1, -0.2, 1.0], [0.5, 0.4, 0.3]
    rewards = torch.tensor([r + [5.0]])  # the fourth token is off the mask: its reward and value do not count
    values = torch.tensor([v + [9.0]])
    mask = torch.tensor([[True, True, True, False]])
    advantages, returns = gae(rewards, values, mask, gamma=gamma, lam=lam)

    a2 = r[2] + gamma * 0.0 - v[2]
    a1 = r[1] + gamma * v[2] - v[1] + gamma * lam * a2
    a0 = r[0] + gamma * v[1] - v[0] + gamma * lam * a1
    raw = [a0, a1, a2]
    mean, std = statistics.fmean(raw), statistics.stdev(raw)  # stdev: the unbiased (n - 1) estimate
    whitened = [(a - mean) / math.sqrt(std**2 + 1e-8) for a in raw]
    torch.testing.assert_close(returns, torch.tensor([[a + b for a, b in zip(raw, v)] + [0.0]]), atol=ATOL, rtol=0)
    torch.testing.assert_close(advantages, torch.tensor([whitened + [0.0]]), atol=1e-5, rtol=0)


def test_rollout_matches_trl_ppo():
    """kl_rewards then gae against TRL 1.12's rollout. TRL's value tokens (~padding_mask_p1) run one token past
    its policy tokens (~padding_mask): given the value tokens as the mask, the rewards and returns match TRL's
    exactly; TRL whitens the advantages over its policy tokens, we over the mask, so they match TRL's whitening
    over the mask, and match TRL's advantages outright where its two masks coincide (full-length rows)."""
    torch.manual_seed(6)
    B, T, c = 5, 7, TRL_PPO_CONFIG
    scores, values = torch.randn(B), torch.randn(B, T)
    logprobs, ref_logprobs = -torch.rand(B, T) * 3, -torch.rand(B, T) * 3
    for lengths in ([6, 1, 4, 5, 3], [6] * B):  # TRL's sequence_lengths: the index of each row's last token
        trl_out = trl_rollout(scores, logprobs, ref_logprobs, values, torch.tensor(lengths), c["kl_coef"],
                              c["gamma"], c["lam"])
        mask = ~trl_out.padding_mask_p1
        rewards = kl_rewards(scores, trl_out.logprobs, trl_out.ref_logprobs, mask, kl_coef=c["kl_coef"])
        advantages, returns = gae(rewards, values, mask)  # gamma 1.0 and lam 0.95 by default, as TRL's
        torch.testing.assert_close(rewards, trl_out.rewards, atol=ATOL, rtol=0)
        torch.testing.assert_close(returns, trl_out.returns, atol=ATOL, rtol=0)
        expected = trl_masked_whiten(trl_out.raw_advantages, mask).masked_fill(~mask, 0)
        torch.testing.assert_close(advantages, expected, atol=1e-5, rtol=0)
        if lengths == [T - 1] * B:  # TRL's two masks coincide
            torch.testing.assert_close(advantages, trl_out.advantages, atol=1e-5, rtol=0)


def test_ppo_policy_loss_takes_the_pessimistic_clipped_branch_and_value_loss_by_hand():
    ratio = [1.5, 0.5, 0.5, 1.1, 1.0]
    logprobs = torch.tensor([[math.log(x) for x in ratio]], requires_grad=True)
    old_logprobs = torch.zeros(1, 5)
    advantages = torch.tensor([[1.0, -1.0, 1.0, 1.0, 50.0]])
    values = torch.tensor([[0.5, 0.5, 0.3, 0.1, 50.0]], requires_grad=True)
    old_values = torch.tensor([[0.0, 0.0, 0.3, 0.0, 0.0]])
    returns = torch.tensor([[0.0, 1.0, 0.3, -1.0, 0.0]])
    mask = torch.tensor([[True, True, True, True, False]])
    out = ppo_losses(logprobs, old_logprobs, advantages, values, old_values, returns, mask)

    # per token, max(-A r, -A clip(r, 0.8, 1.2)):
    #   A=+1 r=1.5 -> -1.2 (clipped)   A=-1 r=0.5 -> 0.8 (clipped)
    #   A=+1 r=0.5 -> -0.5 (outside the range, but the unclipped branch is the pessimistic one)   A=+1 r=1.1 -> -1.1
    assert close(out.policy_loss, (-1.2 + 0.8 - 0.5 - 1.1) / 4)
    assert close(out.clipfrac, 2 / 4)
    # per token, max((v - R)^2, (clip(v, old - 0.2, old + 0.2) - R)^2): 0.25; 0.64 (clipped); 0; 1.21
    assert close(out.value_loss, 0.5 * (0.25 + 0.64 + 0.0 + 1.21) / 4)
    assert close(out.value_clipfrac, 1 / 4)
    assert close(out.loss, out.policy_loss.item() + 0.1 * out.value_loss.item())
    assert close(out.approx_kl, 0.5 * sum(math.log(x) ** 2 for x in ratio[:4]) / 4)
    assert close(out.ratio, sum(ratio[:4]) / 4)

    out.loss.backward()  # the clipped tokens give no gradient; neither does the token off the mask
    assert logprobs.grad[0, :2].abs().max() == 0 and logprobs.grad[0, 4] == 0
    assert close(logprobs.grad[0, 2], -1.0 * 0.5 / 4) and close(logprobs.grad[0, 3], -1.0 * 1.1 / 4)
    assert values.grad[0, 1] == 0 and values.grad[0, 4] == 0
    assert close(values.grad[0, 0], 0.1 * 0.5 * 2 * 0.5 / 4)


def test_ppo_losses_match_trl_ppo():
    """ppo_losses at its defaults against TRL 1.12's micro-batch loss at its PPOConfig defaults, with TRL's two
    masks both set to ours; positions off the mask hold INVALID_LOGPROB, as TRL writes them."""
    torch.manual_seed(7)
    B, T, c = 4, 9, TRL_PPO_CONFIG
    mask = torch.arange(T) <= torch.tensor([8, 2, 5, 6])[:, None]
    old_logprobs = (-torch.rand(B, T) * 3).masked_fill(~mask, INVALID_LOGPROB)
    logprobs = (old_logprobs + 0.3 * torch.randn(B, T)).masked_fill(~mask, INVALID_LOGPROB).requires_grad_()
    advantages = torch.randn(B, T).masked_fill(~mask, 0)
    old_values = torch.randn(B, T).masked_fill(~mask, 0)
    values = (old_values + 0.4 * torch.randn(B, T)).masked_fill(~mask, 0).requires_grad_()
    returns = torch.randn(B, T).masked_fill(~mask, 0)

    out = ppo_losses(logprobs, old_logprobs, advantages, values, old_values, returns, mask)
    ours = torch.autograd.grad(out.loss, (logprobs, values))
    theirs = trl_ppo_losses(logprobs, old_logprobs, advantages, values, old_values, returns, ~mask, ~mask,
                            c["cliprange"], c["cliprange_value"], c["vf_coef"])
    assert 0 < out.clipfrac < 1 and 0 < out.value_clipfrac < 1  # both branches of both clips are exercised
    assert close(out.loss, theirs.loss.item())
    assert close(out.policy_loss, theirs.pg_loss.item())
    assert close(out.value_loss, theirs.vf_loss.item())
    assert close(out.clipfrac, theirs.pg_clipfrac.item())
    assert close(out.value_clipfrac, theirs.vf_clipfrac.item())
    # TRL's approxkl is a mean over every position (0 off the mask); ours is over the mask
    assert close(out.approx_kl * mask.sum() / mask.numel(), theirs.approxkl.item())
    for g, h in zip(ours, torch.autograd.grad(theirs.loss, (logprobs, values))):
        torch.testing.assert_close(g, h, atol=ATOL, rtol=0)


def test_token_logps_gradient_is_that_of_cross_entropy():
    """token_logps is differentiable: its gradient is softmax - onehot, negated, at the kept positions."""
    torch.manual_seed(8)
    logits = torch.randn(2, 3, 5, requires_grad=True)
    targets = torch.tensor([[1, 4, -100], [0, 2, 3]])
    token_logps(logits, targets).sum().backward()
    kept = targets != -100
    expected = (F.one_hot(targets.clamp(min=0), 5) - logits.detach().softmax(-1)) * kept[..., None]
    torch.testing.assert_close(logits.grad, expected, atol=ATOL, rtol=0)
