"""`herd eval MODEL --tasks ...`: benchmarks on a checkpoint or an OpenAI-compatible endpoint."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    from llamaherd.eval.tasks import BUILTIN, LAYOUTS

    p = sub.add_parser(
        "eval", help="evaluate a checkpoint or an OpenAI-compatible endpoint on benchmark tasks",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Multiple choice by log-likelihood, scored as lm-evaluation-harness scores it (acc, acc_norm),\n"
                    "on a checkpoint llamaherd loads or on an endpoint (herd serve, vLLM) that tokenises and echoes\n"
                    "prompt log-probabilities. A task is a built-in name or PATH:LAYOUT for a local file or\n"
                    f"directory in a published layout. Built in: {', '.join(BUILTIN)}. Layouts: {', '.join(LAYOUTS)}.\n"
                    "Nothing is downloaded.",
        epilog="examples:\n"
               "  herd eval runs/tiny --tasks stdlib_docstring_mc\n"
               "  herd eval runs/tiny --tasks data/mmlu:mmlu,data/arc_challenge_test.jsonl:arc --limit 200 \\\n"
               "      --json eval.json\n"
               "  herd eval http://127.0.0.1:8000/v1 --tasks data/arc:arc --num-fewshot 0")
    p.add_argument("model", help="a checkpoint or run directory, or http(s)://... an OpenAI-compatible endpoint")
    p.add_argument("--tasks", required=True, help="comma-separated: built-in names or PATH:LAYOUT")
    p.add_argument("--num-fewshot", type=int, default=None,
                   help="examples before each question (default: the task's, mmlu 5, others 0)")
    p.add_argument("--limit", type=int, default=None, help="the first N items of each task")
    p.add_argument("--json", default=None, metavar="OUT", help="write the results as JSON here")
    p.add_argument("--log-samples", action="store_true", help="per-item records in the JSON")
    p.add_argument("--batch-tokens", type=int, default=8192, help="padded tokens a forward (checkpoints)")
    p.add_argument("--device", default=None, help="cpu, cuda (default: cuda when available)")
    p.add_argument("--api-key", default=None, help="for an endpoint that asks for one")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval)


def scorer_for(model: str, *, device=None, batch_tokens: int = 8192, api_key: str | None = None):
    """A ModelScorer for a checkpoint, an EndpointScorer for an http(s) URL."""
    from llamaherd.errors import HerdError
    from llamaherd.eval.loglik import EndpointScorer, ModelScorer

    if model.startswith(("http://", "https://")):
        return EndpointScorer(model, api_key=api_key)
    import torch

    from llamaherd.checkpoint import load

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    m, tok = load(model, device=device, dtype=None if device.startswith("cuda") else torch.float32)
    if tok is None:
        raise HerdError(f"{model}: has no tokenizer files; evaluation needs one")
    return ModelScorer(m, tok, batch_tokens=batch_tokens)


def cmd_eval(args) -> int:
    import json
    import sys
    from pathlib import Path

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    from rich.table import Table

    from llamaherd.errors import HerdError
    from llamaherd.eval.harness import evaluate_task
    from llamaherd.eval.tasks import load_task

    for name in ("limit", "num_fewshot"):
        value = getattr(args, name)
        if value is not None and value < (1 if name == "limit" else 0):
            raise HerdError(f"--{name.replace('_', '-')} {value}: expected {'1' if name == 'limit' else '0'} or more")
    tasks = [load_task(t.strip()) for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise HerdError("--tasks: expected at least one task")
    scorer = scorer_for(args.model, device=args.device, batch_tokens=args.batch_tokens, api_key=args.api_key)
    err = Console(stderr=True)
    result = {"model": args.model, "tasks": {}}
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, disable=args.no_progress or not err.is_terminal) as bar:
        for task in tasks:
            n = min(len(task.items), args.limit or len(task.items))
            tid = bar.add_task(task.name, total=n)
            result["tasks"][task.name] = evaluate_task(
                scorer, task, num_fewshot=args.num_fewshot, limit=args.limit, log_samples=args.log_samples,
                progress=lambda done, total, tid=tid: bar.update(tid, completed=done))
    table = Table(title=f"herd eval {args.model}")
    for col in ("task", "n", "shots", "acc", "acc_norm"):
        table.add_column(col, justify="left" if col == "task" else "right")
    for name, m in result["tasks"].items():
        table.add_row(name, str(m["n"]), str(m["num_fewshot"]), f"{m['acc']:.4f} ± {m['acc_stderr']:.4f}",
                      f"{m['acc_norm']:.4f} ± {m['acc_norm_stderr']:.4f}")
    Console(file=sys.stdout).print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0
