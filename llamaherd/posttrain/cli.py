"""`herd sft | rm | sample | dpo | ppo`: post-training commands."""

from __future__ import annotations

import argparse

DATA_HELP = {
    "sft": "conversations: {\"messages\": [...]} or {\"prompt\", \"completion\"}",
    "rm": "preference pairs: {\"prompt\", \"chosen\", \"rejected\"[, \"edited\"]}",
    "dpo": "preference pairs: {\"prompt\", \"chosen\", \"rejected\"[, \"edited\"]}",
    "sample": "prompts: {\"prompt\"} or {\"messages\"} (the turns before the last reply)",
    "ppo": "prompts: {\"prompt\"} or {\"messages\"} (the turns before the last reply)",
}


def _stage(sub, name: str, help: str, description: str, examples: list[str], func):
    p = sub.add_parser(name, help=help, formatter_class=argparse.RawDescriptionHelpFormatter,
                       description=description + "\nRunning it again on the same --out resumes.",
                       epilog="examples:\n" + "\n".join(f"  {e}" for e in examples))
    p.add_argument("base", help="the checkpoint to start from (a checkpoint or run directory)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. train.steps=50")
    p.add_argument("--recipe", default=name, help=f"a built-in recipe or a .toml path (default: {name})")
    p.add_argument("--data", action="append", default=None, metavar="FILE",
                   help=f".jsonl / .parquet {DATA_HELP[name]}; repeat for more files (default: the embedded data)")
    p.add_argument("--eval-data", action="append", default=None, metavar="FILE",
                   help="held-out records, same format; repeat for more files")
    p.add_argument("--out", required=True, help="output directory (checkpoints, metrics, a result JSON)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=func)
    return p


def register(sub) -> None:
    _stage(sub, "sft", "supervised fine-tuning on chat data (full or LoRA)",
           "Fine-tune a checkpoint (a run directory, a Meta or Hugging Face Llama 3) on conversations: loss on\n"
           "the assistant's turns only, several conversations packed per row. lora.rank=N trains LoRA adapters\n"
           "instead of every weight. Held-out answers are scored by token F1 against the references, before\n"
           "and after (sft_result.json).",
           ["herd sft runs/tiny --out runs/tiny/sft", "herd sft BASE --data chat.jsonl --out runs/chat lora.rank=8"],
           cmd_sft)
    _stage(sub, "rm", "train a reward model on preference pairs",
           "Train a reward model: the checkpoint's backbone with a scalar head, Bradley-Terry loss without a\n"
           "margin term; accuracy on held-out pairs (rm_result.json).",
           ["herd rm runs/tiny/sft/checkpoints/step_0000150 --out runs/tiny/rm"], cmd_rm)
    p = _stage(sub, "sample", "rejection sampling: best of K by a reward model, then SFT on the best",
               "Sample posttrain.samples_per_prompt replies to each prompt (--data, or the embedded prompts) from\n"
               "the policy, score them with the reward model, keep each prompt's best (best.jsonl, samples.jsonl,\n"
               "rs_stats.json: the score distribution), and fine-tune the policy on the kept conversations into\n"
               "OUT/sft.",
               ["herd sample runs/tiny/sft/checkpoints/step_0000150 --reward-model runs/tiny/rm/checkpoints/"
                "step_0000100 --out runs/tiny/rs"], cmd_sample)
    p.add_argument("--reward-model", required=True, metavar="CKPT", help="a reward model checkpoint (herd rm)")
    p = _stage(sub, "ppo", "PPO against a reward model, with a KL penalty to the starting policy",
               "Train a policy (with a value head) by PPO: rollouts of posttrain.ppo_rollout prompts (--data, or the\n"
               "embedded prompts) scored by the reward model at the end of each reply, a per-token KL penalty to\n"
               "the frozen starting policy, GAE (gamma 1, lambda 0.95), clipped policy and value losses (TRL's\n"
               "defaults). Logs reward, KL and entropy (ppo_result.json).",
               ["herd ppo runs/tiny/sft/checkpoints/step_0000150 --reward-model runs/tiny/rm/checkpoints/"
                "step_0000100 --out runs/tiny/ppo"], cmd_ppo)
    p.add_argument("--reward-model", required=True, metavar="CKPT", help="a reward model checkpoint (herd rm)")
    _stage(sub, "dpo", "direct preference optimisation (Llama 3's recipe)",
           "DPO from a checkpoint (usually the SFT model, also the frozen reference): beta 0.1, lr 1e-5,\n"
           "formatting tokens masked, an NLL term of 0.2 on the chosen response. Held-out preference\n"
           "accuracy before and after (dpo_result.json).",
           ["herd dpo runs/tiny/sft/checkpoints/step_0000150 --out runs/tiny/dpo"], cmd_dpo)


def _config(args):
    from llamaherd.config import load_config

    cfg = load_config(args.recipe, args.overrides)
    if args.data:
        cfg.posttrain.data = list(args.data)
    if args.eval_data:
        cfg.posttrain.eval_data = list(args.eval_data)
    return cfg


def _console():
    from rich.console import Console

    return Console(stderr=True)


def cmd_sft(args) -> int:
    from llamaherd.posttrain.sft import sft

    console = _console()
    result = sft(args.base, _config(args), args.out, progress=not args.no_progress, console=console)
    console.print(f"sft: {result.examples} conversations ({result.skipped} skipped), {result.train.steps} steps; "
                  f"held-out token F1 {result.heldout_token_f1:.3f} (base {result.base_heldout_token_f1:.3f})")
    print(result.train.checkpoint)
    return 0


def cmd_rm(args) -> int:
    from llamaherd.posttrain.reward import train_reward_model

    console = _console()
    result, accuracy = train_reward_model(args.base, _config(args), args.out, progress=not args.no_progress,
                                          console=console)
    console.print(f"reward model: {result.steps} steps; held-out pair accuracy {accuracy:.3f}")
    print(result.checkpoint)
    return 0


def cmd_dpo(args) -> int:
    from llamaherd.posttrain.dpo import dpo

    console = _console()
    result, numbers = dpo(args.base, _config(args), args.out, progress=not args.no_progress, console=console)
    console.print(f"dpo: {numbers['pairs']} pairs, {result.steps} steps; held-out preference accuracy "
                  f"{numbers['heldout_pair_accuracy']:.3f} (before: {numbers['sft_heldout_pair_accuracy']:.3f})")
    print(result.checkpoint)
    return 0


def cmd_sample(args) -> int:
    from llamaherd.posttrain.rejection import rejection_sampling

    console = _console()
    cfg = _config(args)
    cfg.posttrain.prompts, cfg.posttrain.data = cfg.posttrain.data, []  # --data names the prompts here
    result = rejection_sampling(args.base, args.reward_model, cfg, args.out, progress=not args.no_progress,
                                console=console)
    s = result.stats
    console.print(f"rejection sampling: {result.samples} prompts x {cfg.posttrain.samples_per_prompt}; reward "
                  f"mean {s['all']['mean']:.3f}, best-of mean {s['best']['mean']:.3f} (+{s['gain']:.3f}); "
                  f"fine-tuned: held-out token F1 {result.sft.heldout_token_f1:.3f}")
    print(result.sft.train.checkpoint)
    return 0


def cmd_ppo(args) -> int:
    from llamaherd.posttrain.ppo import ppo

    console = _console()
    cfg = _config(args)
    cfg.posttrain.prompts, cfg.posttrain.data = cfg.posttrain.data, []  # --data names the prompts here
    result, n = ppo(args.base, args.reward_model, cfg, args.out, progress=not args.no_progress, console=console)
    console.print(f"ppo: {result.steps} steps; reward {n['initial_reward']:.3f} -> {n['reward']:.3f}, "
                  f"KL {n['kl']:.3f} (target under {n['kl_target']})")
    print(result.checkpoint)
    return 0
