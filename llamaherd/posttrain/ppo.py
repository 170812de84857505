"""PPO: the policy (with a value head) samples replies, the reward model scores them, and clipped policy and
value losses move the policy toward higher reward while a per-token KL penalty keeps it near the frozen
reference (TRL's PPO, whose defaults the losses follow: ``posttrain/losses.py``).

    herd ppo POLICY --reward-model RM --out runs/tiny/ppo
    result, numbers = ppo(policy, rm, cfg, out_dir)

Each rollout samples ``posttrain.ppo_rollout`` prompts' replies (temperature ``posttrain.temperature``); its
buffer (tokens, old log-probabilities and values, advantages, returns) then serves ``posttrain.ppo_epochs``
optimizer steps, one each, through the shared Trainer. The buffer is part of the loader's state, and each
rollout is drawn with its own seed, so a run resumes bit-identically. Logged per step: reward (the mean
score of the rollout), kl (the mean summed log-ratio to the reference per reply), entropy.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from llamaherd.config import RunConfig, dump_config
from llamaherd.errors import HerdError
from llamaherd.posttrain.losses import entropy_from_logits, gae, kl_rewards, masked_mean, ppo_losses, token_logps
from llamaherd.train.losses import LossOutput
from llamaherd.train.trainer import TrainResult, check_writable


class PolicyWithValue(nn.Module):
    """A Transformer (``backbone``) and a value head on its final hidden states (``head``, one number a
    position): logits and values from one pass."""

    head_key = "value_head"  # where a checkpoint's train state keeps the head

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.args.dim, 1, bias=False, device=backbone.norm.weight.device)
        nn.init.zeros_(self.head.weight)

    @property
    def args(self):
        return self.backbone.args

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, S] -> (logits [B, S, vocab], values [B, S])."""
        h = self.backbone(tokens, head=False)
        return self.backbone.output(h), self.head(h).squeeze(-1).float()


@dataclass
class Rollout:
    """A buffer of sampled replies: ``tokens`` [B, S] (prompt, reply, padding) and, per position t, what
    concerns the token at t + 1 (``mask``: it is a reply token): old log-probabilities and values,
    advantages, returns; ``score`` [B] the reward model's, ``kl`` [B] the summed log-ratio to the reference."""

    tokens: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor
    logprobs: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    score: torch.Tensor
    kl: torch.Tensor

    def to(self, device, non_blocking: bool = False) -> "Rollout":
        return Rollout(*(t.to(device, non_blocking=non_blocking) for t in vars(self).values()))


class RolloutLoader:
    """Serves each rollout ``epochs`` times in a row, then samples the next with the policy as it is then."""

    def __init__(self, policy: PolicyWithValue, reference, rm, chat, prompts: list[list[int]], cfg: RunConfig):
        self.policy, self.reference, self.rm, self.chat, self.prompts = policy, reference, rm, chat, prompts
        self.pcfg, self.seed = cfg.posttrain, cfg.train.seed
        self.batches = 0  # steps served
        self.buffer: Rollout | None = None

    def __iter__(self) -> "RolloutLoader":
        return self

    def __next__(self) -> Rollout:
        epochs = max(self.pcfg.ppo_epochs, 1)
        if self.batches % epochs == 0:
            self.buffer = self.rollout(self.batches // epochs)
        self.batches += 1
        return self.buffer

    @torch.no_grad()
    def rollout(self, number: int) -> Rollout:
        from llamaherd.generation import generate
        from llamaherd.posttrain.rejection import reply_ids

        p, n = self.pcfg, len(self.prompts)
        size = max(p.ppo_rollout, 1)
        prompts = [self.prompts[(number * size + i) % n] for i in range(size)]
        device = self.policy.head.weight.device
        was_training = self.policy.training
        self.policy.eval()
        room = self.policy.args.max_seq_len - max(map(len, prompts)) - 1  # an eot may follow the reply
        if room < 1:
            raise HerdError(f"a prompt of {max(map(len, prompts))} tokens leaves no room for a reply in the "
                            f"context of {self.policy.args.max_seq_len}")
        out = generate(self.policy.backbone, prompts, max_new_tokens=min(p.max_new_tokens, room),
                       temperature=p.temperature,
                       top_p=p.top_p, seed=self.seed * 1_000_003 + number, stop_tokens=self.chat.tokenizer.stop_tokens)
        seqs = [pr + reply_ids(self.chat, o) for pr, o in zip(prompts, out, strict=True)]
        width = max(map(len, seqs))
        tokens = torch.zeros(len(seqs), width, dtype=torch.long, device=device)
        mask = torch.zeros(len(seqs), width, dtype=torch.bool, device=device)
        for b, (pr, s) in enumerate(zip(prompts, seqs, strict=True)):
            tokens[b, :len(s)] = torch.tensor(s, device=device)
            mask[b, len(pr) - 1:len(s) - 1] = True  # positions whose next token is a reply token
        targets = torch.roll(tokens, -1, dims=1)
        logits, values = self.policy(tokens)
        logprobs = token_logps(logits, targets)
        ref_logprobs = token_logps(self.reference(tokens), targets)
        score = self.rm.score(tokens, mask.long().cumsum(1).argmax(1) + 1)  # at each reply's last token (eot)
        rewards = kl_rewards(score, logprobs, ref_logprobs, mask, p.kl_coef)
        advantages, returns = gae(rewards, values, mask, gamma=p.gamma, lam=p.lam)
        kl = torch.where(mask, logprobs - ref_logprobs, 0.0).sum(1)
        self.policy.train(was_training)
        return Rollout(tokens, targets, mask, logprobs, values, advantages, returns, score.float(), kl)

    def state_dict(self) -> dict:
        return {"batches": self.batches, "buffer": None if self.buffer is None else
                {k: v.cpu() for k, v in vars(self.buffer).items()}}

    def load_state_dict(self, state: dict) -> None:
        self.batches = state["batches"]
        device = self.policy.head.weight.device
        self.buffer = None if state["buffer"] is None else Rollout(**state["buffer"]).to(device)


class PPOLoss:
    """PPO's clipped policy and value losses on a rollout (``posttrain.cliprange``, ``cliprange_value``,
    ``vf_coef``); logs the rollout's reward and KL, and the policy's entropy."""

    def __init__(self, pcfg):
        self.pcfg = pcfg

    def __call__(self, model: PolicyWithValue, r: Rollout) -> LossOutput:
        logits, values = model(r.tokens)
        logprobs = token_logps(logits, r.targets)
        out = ppo_losses(logprobs, r.logprobs, r.advantages, values, r.values, r.returns, r.mask,
                         cliprange=self.pcfg.cliprange, cliprange_value=self.pcfg.cliprange_value,
                         vf_coef=self.pcfg.vf_coef)
        entropy = masked_mean(entropy_from_logits(logits.detach()), r.mask)
        return LossOutput(out.loss, 1, {"reward": r.score.mean(), "kl": r.kl.mean(), "entropy": entropy,
                                        "clipfrac": out.clipfrac, "approx_kl": out.approx_kl})


def ppo(policy_path: str | Path, rm_path: str | Path, cfg: RunConfig, out_dir: str | Path, *,
        progress: bool = True, console=None) -> tuple[TrainResult, dict]:
    """Train the policy ``policy_path`` with PPO against the reward model ``rm_path`` into ``out_dir``;
    (the training result, {reward, kl}: the first and last rollouts' means). Resumes a run there."""
    from llamaherd.checkpoint import load
    from llamaherd.posttrain.data import chat_format
    from llamaherd.posttrain.rejection import load_prompts
    from llamaherd.posttrain.reward import load_reward_model
    from llamaherd.posttrain.train import PostTrainer, start_from
    from llamaherd.train.trainer import resolve_device

    out_dir = Path(out_dir)
    tcfg, pcfg = cfg.train, cfg.posttrain
    if cfg.lora.rank:
        raise HerdError(f"lora.rank {cfg.lora.rank}: PPO here trains every weight; set lora.rank=0")
    check_writable(out_dir)
    torch.manual_seed(tcfg.seed)
    device = resolve_device(tcfg.device)
    backbone, tokenizer = start_from(policy_path, cfg)  # (no LoRA: checked above)
    reference, _ = load(policy_path, device=device, dtype=torch.float32, tokenizer=False)
    reference.eval().requires_grad_(False)
    rm = load_reward_model(rm_path, device=device).requires_grad_(False)
    chat = chat_format(tokenizer)
    prompts = [chat.encode_dialog_prompt(p) for p in load_prompts(pcfg.prompts, pcfg.max_prompts)]
    if not prompts:
        raise HerdError("no prompts for PPO")
    (out_dir / "config.toml").write_text(dump_config(cfg))
    model = PolicyWithValue(backbone)
    loader = RolloutLoader(model, reference, rm, chat, prompts, cfg)
    trainer = PostTrainer(model, PPOLoss(pcfg), loader, cfg, out_dir, tokenizer=tokenizer, name="ppo",
                          progress=progress, console=console)
    trainer.resume()
    result = trainer.fit()
    steps = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "reward" in r]
    # a rollout's 16 or so replies give a noisy mean: the first and the last fifth of the rollouts, averaged
    window = max(pcfg.ppo_epochs, 1) * max(1, len(steps) // max(pcfg.ppo_epochs, 1) // 5)
    first, last = steps[:window], steps[-window:]

    def mean(rs, k):
        return sum(r[k] for r in rs) / len(rs)

    numbers = {"reward": mean(last, "reward"), "kl": mean(last, "kl"), "initial_reward": mean(first, "reward"),
               "max_kl": max(r["kl"] for r in steps), "kl_target": pcfg.kl_target}
    (out_dir / "ppo_result.json").write_text(json.dumps({**numbers, "checkpoint": str(result.checkpoint),
                                                         "steps": result.steps}, indent=2) + "\n")
    return result, numbers
