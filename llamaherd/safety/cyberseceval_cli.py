"""`herd cyberseceval BENCHMARK --model MODEL --data FILE --out DIR`: Meta's CyberSecEval 2 tests."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    from llamaherd.safety.cyberseceval import BENCHMARKS

    p = sub.add_parser(
        "cyberseceval", help="CyberSecEval 2: prompt injection, false refusals, insecure code (instruct, autocomplete)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Meta's CyberSecEval 2 benchmarks on a checkpoint or an OpenAI-compatible endpoint, on data in\n"
                    "Meta's published layouts (a JSON list or JSONL; 'sample' for the small set shipped here):\n\n"
                    "  prompt-injection  the model answers a system prompt and a user turn carrying an injection;\n"
                    "                    a judge model (--judge) says whether the injection worked (Yes/No)\n"
                    "  frr               the model answers benign prompts that sound risky; a refusal detector\n"
                    "                    gives the false refusal rate\n"
                    "  instruct          the model writes code for a request; Code Shield scans it\n"
                    "  autocomplete      the model continues code; Code Shield scans the continuation\n\n"
                    "Writes OUT/responses.json (each case with the answer and its judgement), OUT/stats.json\n"
                    "(the report in Meta's structure) and OUT/report.md.",
        epilog="examples:\n"
               "  herd cyberseceval frr --model runs/tiny --data sample --out cse/frr\n"
               "  herd cyberseceval prompt-injection --model http://127.0.0.1:8000/v1 \\\n"
               "      --judge http://127.0.0.1:8001/v1 --data prompt_injection.json --out cse/pi\n"
               "  herd cyberseceval instruct --model runs/tiny --data instruct.json --limit 200 --out cse/instruct\n"
               "  herd cyberseceval autocomplete --model http://127.0.0.1:8000/v1 --data autocomplete.json \\\n"
               "      --out cse/autocomplete")
    p.add_argument("benchmark", metavar="BENCHMARK", help=f"one of: {', '.join(BENCHMARKS)}")
    p.add_argument("--model", required=True,
                   help="the model under test: a checkpoint or run directory, or http(s)://.../v1 an endpoint")
    p.add_argument("--data", required=True, metavar="FILE",
                   help="the benchmark's cases in Meta's layout (JSON list or JSONL), or 'sample'")
    p.add_argument("--judge", default=None, metavar="MODEL",
                   help="prompt-injection only: the judge, a checkpoint or an endpoint URL (it may be --model)")
    p.add_argument("--out", required=True, metavar="DIR", help="where responses.json, stats.json, report.md go")
    p.add_argument("--max-tokens", type=int, default=512, help="tokens an answer of the model under test (512)")
    p.add_argument("--judge-max-tokens", type=int, default=16, help="tokens a judge's answer (16)")
    p.add_argument("--limit", type=int, default=None,
                   help="this many cases, spread evenly over the file (default: all)")
    p.add_argument("--device", default=None, help="cpu, cuda, for checkpoints (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_cyberseceval)


def cmd_cyberseceval(args) -> int:
    from llamaherd.safety.cyberseceval import headline, run

    stats = run(args.benchmark, args.model, args.data, args.out, judge=args.judge, max_tokens=args.max_tokens,
                judge_max_tokens=args.judge_max_tokens, limit=args.limit, device=args.device,
                progress=not args.no_progress)
    print(headline(args.benchmark, stats))
    print(f"report: {args.out}/report.md")
    return 0
