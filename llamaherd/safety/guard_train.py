"""`herd guard train`: fine-tune a checkpoint into a guard for any taxonomy, with the guard's own prompt.

    herd guard train runs/tiny --data labelled.jsonl --out runs/guard --categories mine.toml train.steps=200

Data, one JSON object a line (or a Parquet row)::

    {"messages": [{"role": "user", "content": ...}, ...], "label": "safe" | "unsafe", "categories": ["S2"]}

Each conversation becomes the Llama Guard prompt (``guard.guard_prompt``, the same the guard is asked with)
followed by the answer a guard writes ("safe", or "unsafe" and the categories' line) and <|eot_id|>; only the
answer carries loss. Training is post-training's: the SFT recipe's settings, its packed loader (one document
a conversation), the next-token loss and the trainer, with LoRA when ``lora.rank`` is set. A tenth of the
records (at least one, at most 200) is held out; the guard's accuracy on them (its score against 0.5) is
measured before and after, into ``guard_result.json``.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from llamaherd.config import RunConfig
from llamaherd.errors import HerdError
from llamaherd.safety.guard import Category, Guard, answer_of


@dataclass
class Labelled:
    messages: list[dict]
    label: str
    categories: list[str]
    where: str


def read_labelled(paths: list[str], n_categories: int) -> list[Labelled]:
    """The labelled conversations of ``paths``; a one-line error naming the file and line for a bad one."""
    from llamaherd.data.records import read_records
    from llamaherd.safety.guard import _turns

    out = []
    for path in paths:
        for where, r in read_records(Path(path)):
            label, cats = r.get("label"), r.get("categories") or []
            if label not in ("safe", "unsafe"):
                raise HerdError(f"{where}: label {label!r}, expected 'safe' or 'unsafe'")
            if not isinstance(cats, list) or not all(isinstance(c, str) for c in cats):
                raise HerdError(f"{where}: categories: expected a list like [\"S1\", \"S3\"]")
            bad = [c for c in cats if not (c[:1] == "S" and c[1:].isdigit() and 1 <= int(c[1:]) <= n_categories)]
            if bad:
                raise HerdError(f"{where}: category {bad[0]!r} is not one of S1..S{n_categories}")
            if label == "unsafe" and not cats:
                raise HerdError(f"{where}: an unsafe conversation needs its categories")
            try:
                _turns(r.get("messages"))
            except HerdError as e:
                raise HerdError(f"{where}: {e}") from None
            out.append(Labelled(r["messages"], label, cats if label == "unsafe" else [], where))
    if not out:
        raise HerdError(f"{', '.join(paths)}: no labelled conversations")
    return out


def examples_of(guard: Guard, records: list[Labelled]):
    """Post-training examples: the guard prompt (no loss), then the answer and <|eot_id|> (loss)."""
    from llamaherd.posttrain.data import Example

    out = []
    for r in records:
        prompt = guard.prompt_ids(r.messages)
        answer = guard.tokenizer.encode(answer_of(r.label, r.categories), bos=False) + [guard.tokenizer.eot_id]
        out.append(Example(prompt + answer, [False] * len(prompt) + [True] * len(answer)))
    return out


def accuracy(guard: Guard, records: list[Labelled]) -> float:
    """The share of ``records`` whose verdict (the score against the guard's threshold) is their label."""
    if not records:
        return float("nan")
    got = guard.classify_many([r.messages for r in records])
    return sum(g["verdict"] == r.label for g, r in zip(got, records, strict=True)) / len(records)


def train_guard(base: str | Path, data: list[str], cfg: RunConfig, out_dir: str | Path, *, version: int = 2,
                categories: list[Category] | None = None, progress: bool = True, console=None) -> dict:
    """Fine-tune ``base`` into a guard on ``data``; the result record (also ``out_dir/guard_result.json``)."""
    import torch

    from llamaherd.posttrain.data import ChatLoader, eval_batches
    from llamaherd.posttrain.train import PostTrainer, start_from
    from llamaherd.train.losses import NextTokenLoss
    from llamaherd.train.trainer import check_writable

    out_dir = Path(out_dir)
    tcfg = cfg.train
    check_writable(out_dir)
    torch.manual_seed(tcfg.seed)
    model, tokenizer = start_from(base, cfg)
    guard = Guard(base, version=version, categories=categories, model=model, tokenizer=tokenizer)
    records = read_labelled(data, len(guard.categories))
    order = list(range(len(records)))
    random.Random(tcfg.seed).shuffle(order)
    n_held = min(200, max(1, len(records) // 10)) if len(records) > 1 else 0
    heldout = [records[i] for i in order[:n_held]]
    train = [records[i] for i in order[n_held:]]
    examples = examples_of(guard, train)
    longest = max(len(e) for e in examples)
    if longest > tcfg.seq_len:
        raise HerdError(f"a guard example has {longest} tokens, more than train.seq_len {tcfg.seq_len}: raise it "
                        f"(at most the model's {model.args.max_seq_len}) or shorten the conversations")
    from llamaherd.config import dump_config

    (out_dir / "config.toml").write_text(dump_config(cfg))
    before = accuracy(guard, heldout)
    model.train()
    loader = ChatLoader(examples, tcfg.seq_len, tcfg.batch_size, seed=tcfg.seed)
    held_examples = examples_of(guard, heldout)
    trainer = PostTrainer(model, NextTokenLoss(), loader, cfg, out_dir, tokenizer=tokenizer,
                          eval_data=(lambda: eval_batches(held_examples, tcfg.seq_len, tcfg.batch_size))
                          if held_examples else None, name="guard", progress=progress, console=console)
    trainer.resume()
    result = trainer.fit()
    model.eval()
    record = {"heldout_accuracy": accuracy(guard, heldout), "base_heldout_accuracy": before,
              "examples": len(train), "heldout": len(heldout), "version": version,
              "categories": [c.name for c in guard.categories], "checkpoint": str(result.checkpoint),
              "train_loss": result.train_loss, "val_loss": result.val_loss, "steps": result.steps}
    (out_dir / "guard_result.json").write_text(json.dumps(record, indent=2) + "\n")
    # the prompt's settings travel with the guard, so that `herd guard` (and `herd serve --guard`) use them
    settings = {"version": version, "categories": [{"name": c.name, "description": c.description}
                                                    for c in guard.categories]}
    (out_dir / GUARD_SETTINGS).write_text(json.dumps(settings, indent=2) + "\n")
    return record


GUARD_SETTINGS = "guard.json"


def guard_settings(path: str | Path) -> dict | None:
    """``{"version", "categories"}`` written by ``herd guard train`` beside a checkpoint or up to two
    directories above it (the run directory of ``run/checkpoints/step_N``), else None."""
    p = Path(path)
    for d in (p, *list(p.parents)[:2]):
        f = d / GUARD_SETTINGS
        if f.is_file():
            data = json.loads(f.read_text())
            return {"version": data["version"],
                    "categories": [Category(c["name"], c.get("description", "")) for c in data["categories"]]}
    return None
