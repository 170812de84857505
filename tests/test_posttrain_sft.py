"""`herd sft`: full and LoRA fine-tuning on chat data through the shared Trainer, held-out answers scored
by token F1, exact resume after SIGKILL."""

import json
from pathlib import Path

import pytest
from posttrain_runs import assert_same_run, save_byte_base, uninterrupted_and_killed

from llamaherd.checkpoint import load
from llamaherd.config import load_config
from llamaherd.posttrain.sft import sft, token_f1

STEPS = 12


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A small random base model with a byte-level tokenizer (and the Llama 3 chat special tokens)."""
    return save_byte_base(tmp_path_factory.mktemp("base") / "ckpt", max_seq_len=512)


def overrides(**more) -> list[str]:
    values = {"train.steps": STEPS, "train.batch_size": 4, "train.seq_len": 256, "train.warmup_steps": 2,
              "train.eval_every": 6, "train.eval_batches": 2, "train.log_every": 1, "checkpoint.every": 3,
              "posttrain.max_examples": 200, "posttrain.eval_examples": 8, "posttrain.max_new_tokens": 8, **more}
    return [f"{k}={v}" for k, v in values.items()]


def test_token_f1_is_squad_s():
    assert token_f1("Return the JSON string.", "return a json string") == 1.0  # case, articles, punctuation
    # precision 2/2, recall 2/6 (the article dropped): F1 = 2 * 1 * (1/3) / (4/3)
    assert token_f1("serialize obj", "serialize obj to a JSON formatted str") == pytest.approx(0.5)
    assert token_f1("", "x") == 0.0 and token_f1("", "") == 1.0


COLOURS = {"apple": "red", "banana": "yellow", "lime": "green", "plum": "purple", "orange": "orange",
           "blueberry": "blue", "coconut": "brown", "lychee": "pink"}


def colour_data(path: Path, n: int, seed: int) -> None:
    """Conversations "What colour is a ripe X? (question N)" -> "A ripe X is Y." in TRL's format."""
    import random

    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            fruit = rng.choice(sorted(COLOURS))
            f.write(json.dumps({"messages": [
                {"role": "user", "content": f"What colour is a ripe {fruit}? (question {rng.randint(0, 10**6)})"},
                {"role": "assistant", "content": f"A ripe {fruit} is {COLOURS[fruit]}."}]}) + "\n")


def test_sft_raises_heldout_answer_f1_over_the_base(base, tmp_path):
    """Must show 3 (SFT), the mechanism: fine-tuning on chat data makes the greedy answers to held-out
    questions (unseen numbers) share their words with the references, which the base model's do not. (On
    the embedded data and the `tiny` run's base, `herd run` reports the same two numbers.)"""
    colour_data(tmp_path / "train.jsonl", 512, 0)
    colour_data(tmp_path / "heldout.jsonl", 16, 1)
    cfg = load_config("sft", overrides(**{"train.steps": 120, "train.batch_size": 8, "train.lr": 3e-3,
                                          "posttrain.max_examples": 0, "posttrain.eval_examples": 16,
                                          "posttrain.max_new_tokens": 32, "checkpoint.every": 120,
                                          "train.eval_every": 60}))
    cfg.posttrain.data, cfg.posttrain.eval_data = [str(tmp_path / "train.jsonl")], [str(tmp_path / "heldout.jsonl")]
    result = sft(base, cfg, tmp_path / "sft", progress=False)
    assert result.examples == 512 and result.skipped == 0
    assert result.base_heldout_token_f1 < 0.1 and result.heldout_token_f1 > 0.6, result
    written = json.loads((tmp_path / "sft" / "sft_result.json").read_text())
    assert written["heldout_token_f1"] == result.heldout_token_f1
    model, tok = load(result.train.checkpoint)  # the fine-tuned model, loadable as any checkpoint
    assert tok is not None and model.args.dim == 64


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_sft_resumes_after_sigkill_bit_identical(base, tmp_path, lora):
    """Must show 5 (SFT): SIGKILL mid-run, the same command again: the same weights (LoRA: adapters too),
    optimizer moments and logged losses as a run never stopped."""
    extra = overrides(**({"lora.rank": 4, "lora.dropout": 0.1, "train.lr": 3e-3} if lora else {}))
    colour_data(tmp_path / "train.jsonl", 128, 0)
    colour_data(tmp_path / "heldout.jsonl", 8, 1)
    args = ["sft", str(base), "--no-progress", "--data", str(tmp_path / "train.jsonl"), "--eval-data",
            str(tmp_path / "heldout.jsonl"), *extra]
    uninterrupted_and_killed(args, tmp_path / "ref", tmp_path / "run", kill_after=5, steps=STEPS)
    assert_same_run(tmp_path / "ref", tmp_path / "run", STEPS, ("adapter",) if lora else ())
