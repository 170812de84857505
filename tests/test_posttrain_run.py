"""`herd run` with post-training: after pretraining, SFT -> reward model -> rejection sampling -> DPO -> PPO,
each into its own directory, `results.json` in run order, the last model the run's chat model; then `herd eval`
of the base and the final model on the built-in tasks (the `eval` stage)."""

import json

import pytest

import llamaherd
from llamaherd.cli import main
from llamaherd.errors import HerdError

PRETRAIN = [
    "data.max_bytes=300000", "tokenizer.vocab_size=512", "model.dim=64", "model.n_layers=2", "model.n_heads=4",
    "model.n_kv_heads=2", "model.multiple_of=32", "train.steps=20", "train.batch_size=4", "train.seq_len=128",
    "train.eval_every=20", "train.eval_batches=2", "checkpoint.every=20", "sample.max_new_tokens=8",
    'sample.prompts=["def "]', "eval.limit=6",
]
QUICK = ["train.batch_size=4", "train.seq_len=128", "train.eval_every=0", "checkpoint.every=100",
         "posttrain.eval_examples=8", "posttrain.max_new_tokens=8"]
STAGES = {"sft": [*QUICK, "train.steps=6", "posttrain.max_examples=64"],
          "reward_model": [*QUICK, "train.steps=4", "posttrain.max_examples=32"],
          "rejection_sampling": [*QUICK, "train.steps=3", "posttrain.max_prompts=8", "posttrain.samples_per_prompt=2",
                                 "posttrain.sample_batch=4"],
          "dpo": [*QUICK, "train.steps=4", "posttrain.max_examples=16"],
          "ppo": ["train.steps=4", "posttrain.ppo_rollout=4", "posttrain.max_new_tokens=8", "posttrain.max_prompts=8",
                  "checkpoint.every=100"]}


def posttraining(stages=STAGES) -> list[str]:
    return [f"posttraining.stages={json.dumps(list(stages))}",
            f"posttraining.overrides={json.dumps(stages)}"]


def test_herd_run_goes_on_to_post_training_and_ends_with_a_chat_model(tmp_path, capsys):
    run_dir = tmp_path / "tiny"
    assert main(["run", "tiny", *PRETRAIN, *posttraining(), "--out", str(run_dir), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith(f"herd chat {run_dir}")
    results = json.loads((run_dir / "results.json").read_text())["stages"]
    assert [r["stage"] for r in results] == ["pretrain", *STAGES, "eval"]
    metrics = {r["stage"]: r["metrics"] for r in results}
    assert {"val_bpb"} <= set(metrics["pretrain"])
    assert {"heldout_token_f1", "base_heldout_token_f1"} <= set(metrics["sft"])
    assert {"heldout_pair_accuracy", "heldout_pair_loss"} <= set(metrics["reward_model"])
    assert {"heldout_pair_accuracy", "sft_heldout_pair_accuracy", "heldout_implicit_reward_accuracy"} <= set(
        metrics["dpo"])
    assert {"reward", "kl", "initial_reward", "max_kl", "kl_target"} <= set(metrics["ppo"])
    evaluated = metrics["eval"]
    assert evaluated["base"]["checkpoint"] == results[0]["checkpoint"]
    assert evaluated["final"]["checkpoint"] == results[-2]["checkpoint"] == results[-1]["checkpoint"]
    for who in ("base", "final"):
        tasks = evaluated[who]["tasks"]
        assert list(tasks) == ["stdlib_docstring_mc", "stdlib_doctest", "stdlib_perplexity"]
        assert tasks["stdlib_docstring_mc"]["n"] == 6 and 0 <= tasks["stdlib_docstring_mc"]["acc"] <= 1
        assert tasks["stdlib_doctest"]["n"] == 6 and sum(tasks["stdlib_doctest"]["results"].values()) == 6
        assert tasks["stdlib_perplexity"]["bits_per_byte"] > 0
    # post-training changed the model: its held-out bits per byte differ
    assert evaluated["base"]["tasks"]["stdlib_perplexity"]["bits_per_byte"] != pytest.approx(
        evaluated["final"]["tasks"]["stdlib_perplexity"]["bits_per_byte"], abs=1e-6)
    assert (run_dir / "eval" / "eval.png").stat().st_size > 0
    for r in results:  # every stage's checkpoint loads as a model
        model, tok = llamaherd.load(r["checkpoint"])
        assert model.args.dim == 64 and tok is not None
    from llamaherd.checkpoint import resolve

    assert resolve(run_dir) == resolve(results[-1]["checkpoint"])  # the run names its chat model
    report = (run_dir / "report.md").read_text()
    assert "## Post-training" in report and "## Evaluation" in report and "| stdlib_doctest | 6 | pass@1 |" in report
    # running again redoes nothing: every stage has its result
    assert main(["run", "tiny", *PRETRAIN, *posttraining(), "--out", str(run_dir), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "▶ sft" not in err and "▶ dpo" not in err and "▶ eval" not in err


@pytest.mark.parametrize("stages, message", [
    ({"dpo": []}, "starts with sft"), ({"sft": [], "ppo": []}, "ppo needs reward_model before it"),
    ({"sft": [], "rlhf": []}, "unknown stage 'rlhf'"), ({"sft": ["train.nope=1"]}, "train.nope"),
])
def test_post_training_settings_are_checked_before_any_work(tmp_path, capsys, stages, message):
    assert main(["run", "tiny", *posttraining(stages), "--out", str(tmp_path / "run")]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "run").exists()
    with pytest.raises(HerdError):
        from llamaherd.config import load_config
        from llamaherd.posttrain.run import check_stages

        check_stages(load_config("tiny", posttraining(stages)))


@pytest.mark.parametrize("setting, message", [
    ('eval.tasks=["nope"]', "expected a built-in task"), ('eval.tasks=["x.jsonl:mmlu"]', "x.jsonl: file not found"),
    ('eval.tasks=["x.jsonl:hellaswag"]', "unknown layout 'hellaswag'"), ("eval.limit=-1", "eval.limit -1"),
])
def test_evaluation_settings_are_checked_before_any_work(tmp_path, capsys, setting, message):
    assert main(["run", "tiny", setting, "--out", str(tmp_path / "run")]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "run").exists()
