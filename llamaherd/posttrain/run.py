"""The main job's post-training: after `herd run` has pretrained, the stages of ``posttraining.stages``.

    runs/NAME/
        sft/  reward_model/  rejection_sampling/  dpo/  ppo/     each stage's own run directory
        results.json      {"stages": [{"stage", "checkpoint", "metrics"}, ...]} in run order, pretrain first

The stages, each on its built-in recipe (``sft``, ``rm``, ``sample``, ``dpo``, ``ppo``) with the overrides of
``posttraining.overrides``, and what each starts from:

    sft                 the pretrained model        -> heldout_token_f1, base_heldout_token_f1
    reward_model        the SFT model               -> heldout_pair_accuracy, heldout_pair_loss
    rejection_sampling  the SFT model + the RM      -> its own fine-tuned checkpoint, the score distribution
    dpo                 the newest policy so far    -> heldout_pair_accuracy, sft_heldout_pair_accuracy,
                                                       heldout_implicit_reward_accuracy
    ppo                 the newest policy + the RM  -> reward, kl

A stage that has written its result is not run again; one killed half-way resumes from its checkpoint.
The last stage's model is the run's chat model: ``llamaherd.load("runs/NAME")`` and ``herd chat runs/NAME``
take it (``results.json``'s last checkpoint).
"""

from __future__ import annotations

import json
from pathlib import Path

from llamaherd.config import RunConfig, load_config
from llamaherd.errors import HerdError

STAGES = {"sft": "sft", "reward_model": "rm", "rejection_sampling": "sample", "dpo": "dpo", "ppo": "ppo"}
NEEDS_RM = ("rejection_sampling", "ppo")


def check_stages(cfg: RunConfig) -> None:
    """A one-line error, before any work, for an unknown stage, a stage out of order or without its inputs,
    or a bad override."""
    stages = cfg.posttraining.stages
    unknown = [s for s in stages if s not in STAGES] + [s for s in cfg.posttraining.overrides if s not in STAGES]
    if unknown:
        raise HerdError(f"posttraining: unknown stage {unknown[0]!r} (expected any of {', '.join(STAGES)})")
    if len(set(stages)) != len(stages):
        raise HerdError("posttraining.stages: a stage is listed twice")
    if stages and stages[0] != "sft":
        raise HerdError("posttraining.stages: post-training starts with sft (the others start from its model)")
    for s in NEEDS_RM:
        if s in stages and ("reward_model" not in stages or stages.index("reward_model") > stages.index(s)):
            raise HerdError(f"posttraining.stages: {s} needs reward_model before it")
    for s in stages:
        stage_config(cfg, s)  # bad overrides fail here


def stage_config(cfg: RunConfig, stage: str) -> RunConfig:
    """The stage's built-in recipe with ``posttraining.overrides[stage]``, on the run's device and seed."""
    overrides = cfg.posttraining.overrides.get(stage, [])
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise HerdError(f"posttraining.overrides.{stage}: expected a list of 'key=value' strings")
    stage_cfg = load_config(STAGES[stage], [f"train.device={cfg.train.device}", f"train.seed={cfg.train.seed}",
                                            *overrides])
    return stage_cfg


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _stage(stage: str, scfg: RunConfig, out: Path, policy: Path, sft_model: Path | None, rm: Path | None,
           kw: dict) -> dict:
    """Run one stage; its {"checkpoint", "metrics"}."""
    if stage == "sft":
        from llamaherd.posttrain.sft import sft

        r = sft(policy, scfg, out, **kw)
        return {"checkpoint": r.train.checkpoint, "metrics": {
            "heldout_token_f1": r.heldout_token_f1, "base_heldout_token_f1": r.base_heldout_token_f1,
            "train_loss": r.train.train_loss, "val_loss": r.train.val_loss, "examples": r.examples}}
    if stage == "reward_model":
        from llamaherd.posttrain.reward import train_reward_model

        r, accuracy = train_reward_model(sft_model, scfg, out, **kw)
        loss = json.loads((out / "rm_result.json").read_text())["heldout_pair_loss"]
        return {"checkpoint": r.checkpoint, "metrics": {"heldout_pair_accuracy": accuracy, "heldout_pair_loss": loss,
                                                        "train_loss": r.train_loss}}
    if stage == "rejection_sampling":
        from llamaherd.posttrain.rejection import rejection_sampling

        r = rejection_sampling(sft_model, rm, scfg, out, **kw)
        return {"checkpoint": r.sft.train.checkpoint, "metrics": {
            "prompts": r.samples, "reward_mean": r.stats["all"]["mean"], "best_reward_mean": r.stats["best"]["mean"],
            "heldout_token_f1": r.sft.heldout_token_f1}}
    if stage == "dpo":
        from llamaherd.posttrain.dpo import dpo

        r, numbers = dpo(policy, scfg, out, **kw)
        return {"checkpoint": r.checkpoint, "metrics": {
            k: numbers[k] for k in ("heldout_pair_accuracy", "sft_heldout_pair_accuracy",
                                    "heldout_implicit_reward_accuracy", "pairs")}}
    from llamaherd.posttrain.ppo import ppo

    r, numbers = ppo(policy, rm, scfg, out, **kw)
    return {"checkpoint": r.checkpoint, "metrics": {k: numbers[k] for k in ("reward", "kl", "initial_reward",
                                                                            "max_kl", "kl_target")}}


def run_stages(cfg: RunConfig, run_dir: Path, pretrain_checkpoint: Path, pretrain_metrics: dict, *,
               progress: bool = True, console=None, announce=None) -> list[dict]:
    """Run ``posttraining.stages`` after pretraining; write and return ``results.json``'s stages.
    ``announce(name, fn, *args)`` runs each stage (the main job times them); default: just run it."""
    announce = announce or (lambda name, fn, *args: fn(*args))
    results = [{"stage": "pretrain", "checkpoint": str(pretrain_checkpoint), "metrics": pretrain_metrics}]
    policy, sft_model, rm = Path(pretrain_checkpoint), None, None
    for stage in cfg.posttraining.stages:
        out = run_dir / stage
        done = _read(out / "stage_result.json")
        if done is None:
            done = announce(stage, _stage, stage, stage_config(cfg, stage), out, policy, sft_model, rm,
                            {"progress": progress, "console": console})
            done["checkpoint"] = str(done["checkpoint"])
            (out / "stage_result.json").write_text(json.dumps(done, indent=2) + "\n")
        results.append({"stage": stage, **done})
        if stage == "reward_model":
            rm = Path(done["checkpoint"])
        else:
            policy = Path(done["checkpoint"])
            sft_model = sft_model or policy
    (run_dir / "results.json").write_text(json.dumps({"stages": results}, indent=2) + "\n")
    return results


def report_lines(results: list[dict]) -> list[str]:
    """report.md's post-training section."""
    lines = ["", "## Post-training", "", "| stage | checkpoint | numbers |", "|---|---|---|"]
    for r in results:
        numbers = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in r["metrics"].items())
        lines.append(f"| {r['stage']} | `{r['checkpoint']}` | {numbers} |")
    return lines
