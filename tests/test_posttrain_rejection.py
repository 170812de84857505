"""`herd sample`: rejection sampling — K samples per prompt, the reward model's favourite kept, the policy
fine-tuned on the kept ones; resumable bit for bit."""

import io
import json

import pytest
import torch
from posttrain_runs import assert_same_run, save_byte_base, uninterrupted_and_killed
from rich.console import Console
from test_posttrain_preference import pairs

from llamaherd.config import load_config
from llamaherd.posttrain.data import chat_format
from llamaherd.posttrain.rejection import rejection_sampling, score_stats
from llamaherd.posttrain.reward import load_reward_model, train_reward_model
from llamaherd.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A byte-level policy, a reward model (a few steps on fruit-vs-tool pairs) and 24 prompts."""
    tmp = tmp_path_factory.mktemp("rs")
    save_byte_base(tmp / "policy", max_seq_len=256)
    (tmp / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs(64, 0)))
    cfg = load_config("rm", ["train.steps=4", "train.batch_size=4", "train.seq_len=64", "train.eval_every=4",
                             "checkpoint.every=4", "posttrain.eval_examples=8"])
    cfg.posttrain.data = cfg.posttrain.eval_data = [str(tmp / "pairs.jsonl")]
    result, _ = train_reward_model(tmp / "policy", cfg, tmp / "rm", progress=False)
    (tmp / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p["prompt"]}) + "\n" for p in pairs(24, 5)))
    return tmp, result.checkpoint


def overrides(**more) -> list[str]:
    values = {"train.steps": 6, "train.batch_size": 4, "train.seq_len": 128, "train.warmup_steps": 1,
              "train.eval_every": 3, "train.eval_batches": 1, "train.log_every": 1, "checkpoint.every": 2,
              "posttrain.samples_per_prompt": 3, "posttrain.sample_batch": 4, "posttrain.max_new_tokens": 12,
              "posttrain.eval_examples": 4, "posttrain.temperature": 1.0, **more}
    return [f"{k}={v}" for k, v in values.items()]


def test_the_best_of_k_by_the_reward_model_is_kept_and_trained_on(setup, tmp_path):
    tmp, rm_ckpt = setup
    cfg = load_config("sample", overrides())
    cfg.posttrain.prompts = [str(tmp / "prompts.jsonl")]
    console = Console(file=io.StringIO(), force_terminal=True)  # with progress bars, as `herd run` shows them
    result = rejection_sampling(tmp / "policy", rm_ckpt, cfg, tmp_path / "rs", progress=True, console=console)
    assert "rejection sampling" in console.file.getvalue()
    records = [json.loads(line) for line in (tmp_path / "rs" / "samples.jsonl").read_text().splitlines()]
    assert result.samples == len(records) == 24 and all(len(r["samples"]) == 3 for r in records)
    # each score is the reward model's score of that conversation alone, and the kept one is the highest
    rm = load_reward_model(rm_ckpt)
    chat = chat_format(Tokenizer.from_ranks({bytes([i]): i for i in range(256)}))
    for r in records[:4]:
        for text, ids, score in zip(r["samples"], r["sample_ids"], r["scores"], strict=True):
            assert ids[-1] == chat.tokenizer.eot_id and text == chat.decode_assistant(ids)
            ids = chat.encode_dialog_prompt(r["prompt"]) + ids
            with torch.no_grad():
                alone = float(rm.score(torch.tensor([ids]), torch.tensor([len(ids) - 1])))
            assert alone == pytest.approx(score, abs=1e-4)
        assert r["scores"][r["best"]] == max(r["scores"])
    assert len({s for r in records for s in r["samples"]}) > 24  # sampled, not greedy: replies differ
    best = [json.loads(line) for line in (tmp_path / "rs" / "best.jsonl").read_text().splitlines()]
    kept = [r for r in records if r["samples"][r["best"]].strip()]
    assert [b["messages"][-1]["content"] for b in best] == [r["samples"][r["best"]] for r in kept]
    stats = json.loads((tmp_path / "rs" / "rs_stats.json").read_text())
    assert stats == json.loads(json.dumps(score_stats(records))) and stats["best"]["mean"] >= stats["all"]["mean"]
    assert result.sft.train.checkpoint.parent.parent == tmp_path / "rs" / "sft" and result.sft.examples == len(best)


def test_score_stats_by_hand():
    records = [{"scores": [1.0, 3.0], "best": 1}, {"scores": [-1.0, 0.0], "best": 1}]
    stats = score_stats(records)
    assert stats["all"]["mean"] == 0.75 and stats["best"]["mean"] == 1.5 and stats["gain"] == 0.75
    assert stats["all"]["min"] == -1.0 and stats["best"]["max"] == 3.0 and stats["all"]["n"] == 4


def test_rejection_sampling_resumes_after_sigkill_bit_identical(setup, tmp_path):
    """Must show 5 (rejection sampling): killed while sampling, started again: the same samples file, then
    the same fine-tuned model, as a run never stopped."""
    tmp, rm_ckpt = setup
    args = ["sample", str(tmp / "policy"), "--reward-model", str(rm_ckpt), "--data", str(tmp / "prompts.jsonl"),
            "--no-progress", *overrides(**{"posttrain.sample_batch": 2})]
    def sampled(run) -> int:
        path = run / "samples.jsonl"
        return path.read_text().count("\n") if path.is_file() else 0

    # killed while sampling: a few batches of prompts written, most still to come
    uninterrupted_and_killed(args, tmp_path / "ref", tmp_path / "run", kill_after=0, steps=6,
                             kill_when=lambda run: sampled(run) >= 4, finished=lambda run: sampled(run) == 24)
    assert (tmp_path / "ref" / "samples.jsonl").read_bytes() == (tmp_path / "run" / "samples.jsonl").read_bytes()
    assert_same_run(tmp_path / "ref" / "sft", tmp_path / "run" / "sft", 6)
