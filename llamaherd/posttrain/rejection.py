"""Rejection sampling: K samples per prompt from the policy, scored by the reward model, the best kept as
new SFT data, and the policy fine-tuned on it (as Meta did in each round, so this stage has its own
checkpoint).

    herd sample POLICY --reward-model RM --out runs/tiny/rs            # the embedded prompts
    result = rejection_sampling(policy, rm, cfg, out_dir)

Into ``out_dir``: ``samples.jsonl`` (one line per prompt: the prompt, its K samples as text and token ids,
their scores and which was best), ``best.jsonl`` (the kept conversations, TRL's format), ``rs_stats.json`` (the score
distribution: all samples and the best of each prompt) and the fine-tuned model in ``sft/``. Sampling is
resumable: each batch of prompts is drawn with its own seed (``train.seed`` and its number) and appended
whole, so a run killed at any moment and started again writes exactly the same file.
"""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from llamaherd.config import RunConfig
from llamaherd.errors import HerdError
from llamaherd.posttrain.data import chat_format, read_records


@dataclass
class RejectionResult:
    samples: int  # prompts sampled
    stats: dict  # the score distribution (rs_stats.json)
    sft: object  # the SFTResult of fine-tuning on the best samples


def load_prompts(paths: list[str], limit: int = 0) -> list[list[dict]]:
    """Prompts (message lists ending with a user turn) from records with ``prompt`` or ``messages`` (the turns
    before the last assistant one), or the embedded prompts of the training modules."""
    if not paths:
        from llamaherd.posttrain.embedded import rl_prompts

        out = rl_prompts("train")
    else:
        from llamaherd.posttrain.data import _messages

        out = []
        for path in paths:
            for where, record in read_records(path):
                if "prompt" in record:
                    out.append(_messages(record["prompt"], "user", f"{where}: prompt"))
                elif "messages" in record:
                    msgs = _messages(record["messages"], "user", f"{where}: messages")
                    while msgs and msgs[-1]["role"] == "assistant":
                        msgs = msgs[:-1]
                    if msgs:
                        out.append(msgs)
                else:
                    raise HerdError(f"{where}: expected 'prompt' or 'messages'")
    return out[:limit] if limit else out


def _done_lines(path: Path) -> list[dict]:
    """The complete lines of ``path`` (a line cut by a kill is dropped from the file)."""
    if not path.is_file():
        return []
    raw = path.read_bytes()
    keep = raw[:raw.rfind(b"\n") + 1]
    if len(keep) != len(raw):
        with open(path, "r+b") as f:
            f.truncate(len(keep))
    return [json.loads(line) for line in keep.decode().splitlines()]


def reply_ids(chat, generated: list[int]) -> list[int]:
    """A sampled reply's token ids as the conversation holds them: up to its first stop token, then eot."""
    stops = set(chat.tokenizer.stop_tokens)
    end = next((i for i, t in enumerate(generated) if t in stops), len(generated))
    return list(generated[:end]) + [chat.tokenizer.eot_id]


@torch.no_grad()
def score_conversations(rm, ids: list[list[int]]) -> list[float]:
    """The reward model's score of each token sequence (scored at its last token; cut to the model's context)."""
    device = rm.head.weight.device
    ids = [x[-rm.args.max_seq_len:] for x in ids]
    width = max(map(len, ids))
    tokens = torch.zeros(len(ids), width, dtype=torch.long, device=device)
    for b, x in enumerate(ids):
        tokens[b, :len(x)] = torch.tensor(x, device=device)
    return rm.score(tokens, torch.tensor([len(x) - 1 for x in ids], device=device)).tolist()


@torch.no_grad()
def sample_and_score(policy, rm, chat, prompts: list[list[dict]], k: int, *, temperature: float, top_p: float,
                     max_new_tokens: int, seed: int) -> list[dict]:
    """For each prompt, ``k`` sampled replies (text and token ids) and the reward model's score of each: the
    score of the prompt followed by exactly the sampled tokens."""
    from llamaherd.generation import generate

    ids = [chat.encode_dialog_prompt(p) for p in prompts]
    out = generate(policy, [x for x in ids for _ in range(k)], max_new_tokens=max_new_tokens,
                   temperature=temperature, top_p=top_p, seed=seed, stop_tokens=chat.tokenizer.stop_tokens)
    records = []
    for i, prompt in enumerate(prompts):
        replies = [reply_ids(chat, o) for o in out[i * k:(i + 1) * k]]
        scores = score_conversations(rm, [ids[i] + r for r in replies])
        best = max(range(k), key=lambda j: scores[j])
        records.append({"prompt": prompt, "samples": [chat.decode_assistant(r) for r in replies],
                        "sample_ids": replies, "scores": scores, "best": best})
    return records


def score_stats(records: list[dict]) -> dict:
    """Mean, spread and range of every sample's score and of each prompt's best."""
    def describe(xs: list[float]) -> dict:
        q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
        return {"n": len(xs), "mean": statistics.fmean(xs), "std": statistics.pstdev(xs), "min": min(xs),
                "p25": q[0], "median": q[1], "p75": q[2], "max": max(xs)}

    every = [s for r in records for s in r["scores"]]
    best = [r["scores"][r["best"]] for r in records]
    return {"all": describe(every), "best": describe(best), "gain": statistics.fmean(best) - statistics.fmean(every)}


def rejection_sampling(policy_path: str | Path, rm_path: str | Path, cfg: RunConfig, out_dir: str | Path, *,
                       progress: bool = True, console=None) -> RejectionResult:
    """Sample ``posttrain.samples_per_prompt`` replies to each prompt, keep the reward model's favourite, and
    fine-tune the policy on the kept conversations (``train.*`` as for SFT) into ``out_dir/sft``."""
    from llamaherd.checkpoint import load
    from llamaherd.posttrain.reward import load_reward_model
    from llamaherd.posttrain.sft import sft
    from llamaherd.train.trainer import check_writable, resolve_device

    out_dir = Path(out_dir)
    pcfg = cfg.posttrain
    if pcfg.samples_per_prompt < 1:
        raise HerdError(f"posttrain.samples_per_prompt {pcfg.samples_per_prompt}: expected 1 or more")
    check_writable(out_dir)
    device = resolve_device(cfg.train.device)
    policy, tokenizer = load(policy_path, device=device, dtype=torch.float32)
    if tokenizer is None:
        raise HerdError(f"{policy_path}: the checkpoint has no tokenizer: sampling needs one")
    policy.eval()
    rm = load_reward_model(rm_path, device=device)
    chat = chat_format(tokenizer)
    prompts = load_prompts(pcfg.prompts, pcfg.max_prompts)
    if not prompts:
        raise HerdError("no prompts to sample")
    samples_path = out_dir / "samples.jsonl"
    records = _done_lines(samples_path)
    step = max(pcfg.sample_batch, 1)
    if len(records) > len(prompts) or (len(records) % step and len(records) < len(prompts)):
        raise HerdError(f"{samples_path}: holds {len(records)} prompts, not what this run's batches of {step} "
                        f"from {len(prompts)} prompts write; use another --out")
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, disable=not progress) as bar:
        task = bar.add_task("rejection sampling", total=len(prompts), completed=len(records))
        with open(samples_path, "a", encoding="utf-8") as f:
            for start in range(len(records), len(prompts), step):
                batch = sample_and_score(policy, rm, chat, prompts[start:start + step], pcfg.samples_per_prompt,
                                         temperature=pcfg.temperature, top_p=pcfg.top_p,
                                         max_new_tokens=pcfg.max_new_tokens, seed=cfg.train.seed + start // step)
                f.write("".join(json.dumps(r) + "\n" for r in batch))
                f.flush()
                os.fsync(f.fileno())
                records += batch
                bar.update(task, advance=len(batch))
    stats = score_stats(records)
    (out_dir / "rs_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    best = out_dir / "best.jsonl"
    best.write_text("".join(json.dumps({"messages": r["prompt"] + [{"role": "assistant",
                                                                   "content": r["samples"][r["best"]]}]}) + "\n"
                            for r in records if r["samples"][r["best"]].strip()))
    del policy, rm
    cfg.posttrain.data = [str(best)]
    result = sft(policy_path, cfg, out_dir / "sft", progress=progress, console=console)
    return RejectionResult(len(records), stats, result)
