"""`herd ppo`: PPO against a reward model raises the reward while the KL to the starting policy stays under
its target; resumable bit for bit."""

import json
import random

import pytest
from posttrain_runs import assert_same_run, save_byte_base, uninterrupted_and_killed

from llamaherd.config import load_config
from llamaherd.posttrain.ppo import ppo
from llamaherd.posttrain.reward import train_reward_model
from llamaherd.posttrain.sft import sft


def exclaim(n: int, seed: int) -> list[dict]:
    """Pairs "Say something, number N." -> "!" preferred to "?"."""
    rng = random.Random(seed)
    return [{"prompt": [{"role": "user", "content": f"Say something, number {rng.randint(0, 10**6)}."}],
             "chosen": [{"role": "assistant", "content": "!"}],
             "rejected": [{"role": "assistant", "content": "?"}]} for _ in range(n)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A reward model that prefers the reply "!" to "?", a policy fine-tuned to reply either, half and half
    (so that its rollouts hold both), and prompts."""
    tmp = tmp_path_factory.mktemp("ppo")
    save_byte_base(tmp / "base", max_seq_len=128)
    (tmp / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in exclaim(128, 0)))
    small = ["train.steps=40", "train.batch_size=8", "train.seq_len=64", "train.lr=3e-3", "train.eval_every=40",
             "checkpoint.every=40", "posttrain.eval_examples=4", "posttrain.max_new_tokens=2"]
    cfg = load_config("rm", small)
    cfg.posttrain.data = cfg.posttrain.eval_data = [str(tmp / "pairs.jsonl")]
    rm, accuracy = train_reward_model(tmp / "base", cfg, tmp / "rm", progress=False)
    assert accuracy == 1.0
    (tmp / "sft.jsonl").write_text("".join(json.dumps({"messages": p["prompt"] + p["chosen" if i % 2 else "rejected"]})
                                           + "\n" for i, p in enumerate(exclaim(256, 1))))
    cfg = load_config("sft", small)
    cfg.posttrain.data = cfg.posttrain.eval_data = [str(tmp / "sft.jsonl")]
    policy = sft(tmp / "base", cfg, tmp / "sft", progress=False).train.checkpoint
    (tmp / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p["prompt"]}) + "\n" for p in exclaim(64, 2)))
    return tmp, policy, rm.checkpoint


def overrides(**more) -> list[str]:
    values = {"train.steps": 40, "train.lr": 1e-3, "train.log_every": 1, "checkpoint.every": 10,
              "posttrain.ppo_rollout": 8, "posttrain.ppo_epochs": 2, "posttrain.max_new_tokens": 4, **more}
    return [f"{k}={v}" for k, v in values.items()]


def test_ppo_raises_the_reward_while_kl_stays_under_its_target(setup, tmp_path):
    """Must show 3 (PPO)."""
    tmp, policy, rm = setup
    cfg = load_config("ppo", overrides())
    cfg.posttrain.prompts = [str(tmp / "prompts.jsonl")]
    result, numbers = ppo(policy, rm, cfg, tmp_path / "ppo", progress=False)
    logged = [json.loads(line) for line in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in logged if "reward" in r]
    assert len(steps) == 40 and all({"reward", "kl", "entropy", "clipfrac"} <= set(r) for r in steps)
    first = sum(r["reward"] for r in steps[:8]) / 8
    last = sum(r["reward"] for r in steps[-8:]) / 8
    assert last > first + 0.5, (first, last)
    assert max(r["kl"] for r in steps) < cfg.posttrain.kl_target
    # ppo_result.json: the last fifth of the rollouts (4 of 20, 2 steps each) against the first fifth
    assert numbers["reward"] == pytest.approx(sum(r["reward"] for r in steps[-8:]) / 8)
    assert numbers["initial_reward"] == pytest.approx(first)
    assert numbers["max_kl"] == max(r["kl"] for r in steps) < numbers["kl_target"]


def test_ppo_resumes_after_sigkill_bit_identical(setup, tmp_path):
    """Must show 5 (PPO): the rollout buffer is part of the state, each rollout has its own seed."""
    tmp, policy, rm = setup
    args = ["ppo", str(policy), "--reward-model", str(rm), "--data", str(tmp / "prompts.jsonl"),
            "--no-progress", *overrides(**{"train.steps": 12, "checkpoint.every": 3})]
    uninterrupted_and_killed(args, tmp_path / "ref", tmp_path / "run", kill_after=5, steps=12)
    assert_same_run(tmp_path / "ref", tmp_path / "run", 12, ("value_head",))
