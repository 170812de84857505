"""`herd rm` and `herd dpo`: preference training through the shared Trainer, on pairs whose preference a
small model can learn (chosen answers name a fruit, rejected ones a tool), held-out prompts unseen."""

import json
import random

import pytest
import torch
from posttrain_runs import assert_same_run, save_byte_base, uninterrupted_and_killed

from llamaherd.checkpoint import load
from llamaherd.config import load_config
from llamaherd.posttrain.dpo import dpo
from llamaherd.posttrain.reward import load_reward_model, train_reward_model
from llamaherd.tokenizer import Tokenizer

FRUITS = ["apple", "pear", "plum", "fig", "kiwi", "lime", "mango", "peach"]
TOOLS = ["hammer", "saw", "drill", "wrench", "chisel", "file", "level", "clamp"]


def pairs(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": [{"role": "user", "content": f"Name something to eat, number {rng.randint(0, 10**6)}."}],
             "chosen": [{"role": "assistant", "content": f"A {rng.choice(FRUITS)}."}],
             "rejected": [{"role": "assistant", "content": f"A {rng.choice(TOOLS)}."}]} for _ in range(n)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pref")
    save_byte_base(tmp / "base", max_seq_len=256)
    for name, n, seed in (("train", 256, 0), ("heldout", 64, 1)):
        (tmp / f"{name}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs(n, seed)))
    return tmp


def config(recipe: str, setup, **more):
    values = {"train.steps": 40, "train.batch_size": 8, "train.seq_len": 64, "train.warmup_steps": 4,
              "train.eval_every": 20, "train.eval_batches": 2, "train.log_every": 1, "checkpoint.every": 10,
              "posttrain.eval_examples": 64, **more}
    cfg = load_config(recipe, [f"{k}={v}" for k, v in values.items()])
    cfg.posttrain.data = [str(setup / "train.jsonl")]
    cfg.posttrain.eval_data = [str(setup / "heldout.jsonl")]
    return cfg


def test_the_reward_model_learns_the_preference_and_loads_with_its_head(setup, tmp_path):
    cfg = config("rm", setup, **{"train.lr": 3e-3, "train.steps": 80})
    result, accuracy = train_reward_model(setup / "base", cfg, tmp_path / "rm", progress=False)
    assert accuracy >= 0.75, accuracy  # chance: 0.5 (64 held-out pairs: 0.75 is 4 standard deviations above)
    written = json.loads((tmp_path / "rm" / "rm_result.json").read_text())
    assert written["heldout_pair_accuracy"] == accuracy and written["pairs"] == 256
    assert written["heldout_pair_loss"] < 0.5  # Bradley-Terry loss on the held-out pairs; chance: ln 2 = 0.693
    rm = load_reward_model(result.checkpoint)  # backbone + head, from the checkpoint alone
    assert rm.head.weight.abs().sum() > 0
    backbone, _ = load(result.checkpoint)  # the backbone is an ordinary checkpoint
    assert backbone.args.dim == 64
    # the loaded model scores the held-out pairs exactly as the trained one did
    from llamaherd.posttrain.data import chat_format, pair_eval_batches
    from llamaherd.posttrain.reward import encode_pairs, load_pairs, pair_accuracy

    chat = chat_format(Tokenizer.from_ranks({bytes([i]): i for i in range(256)}))
    heldout = encode_pairs(chat, load_pairs([str(setup / "heldout.jsonl")], "val"))
    with torch.no_grad():
        again = pair_accuracy(lambda b: rm(b.tokens, b.last), pair_eval_batches(heldout, 64, 8))
    assert again == accuracy


@pytest.mark.parametrize("nll_alpha", [0.2, 0.0], ids=["dpo+nll", "dpo"])
def test_dpo_raises_heldout_preference_accuracy(setup, tmp_path, nll_alpha):
    cfg = config("dpo", setup, **{"train.lr": 1e-3, "posttrain.nll_alpha": nll_alpha})
    result, numbers = dpo(setup / "base", cfg, tmp_path / "dpo", progress=False)
    assert numbers["heldout_pair_accuracy"] >= numbers["sft_heldout_pair_accuracy"] + 0.3, numbers
    assert numbers["heldout_pair_accuracy"] >= 0.9, numbers
    assert numbers["heldout_implicit_reward_accuracy"] >= 0.9, numbers  # against the starting model
    logged = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in logged if "loss" in r]
    assert len(steps) == 40 and all({"reward_margin", "implicit_reward_accuracy"} <= set(r) for r in steps)
    assert (tmp_path / "dpo" / "reference_logps.pt").is_file()


@pytest.mark.parametrize("stage", ["rm", "dpo"])
def test_rm_and_dpo_resume_after_sigkill_bit_identical(setup, tmp_path, stage):
    """Must show 5 (reward model, DPO): SIGKILL mid-run, the same command again ends with the same weights,
    head, optimizer moments and logged numbers as a run never stopped."""
    steps = 16
    args = ["--data", str(setup / "train.jsonl"), "--eval-data", str(setup / "heldout.jsonl"), "--no-progress",
            f"train.steps={steps}", "train.batch_size=4", "train.seq_len=64", "train.log_every=1",
            "train.eval_every=8", "checkpoint.every=3", "train.lr=1e-3", "posttrain.eval_examples=16"]
    uninterrupted_and_killed([stage, str(setup / "base"), *args], tmp_path / "ref", tmp_path / "run",
                             kill_after=7, steps=steps)
    assert_same_run(tmp_path / "ref", tmp_path / "run", steps, ("reward_head",) if stage == "rm" else ())
