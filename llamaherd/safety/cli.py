"""`herd guard` (Llama Guard prompts, moderation by a guard model, training a guard), `herd codeshield`
(insecure code in a model's output) and `herd cyberseceval` (Meta's CyberSecEval 2 benchmarks)."""

from __future__ import annotations

import argparse


def _prompt_options(p) -> None:
    p.add_argument("--guard-version", type=int, default=None, choices=(2, 3),
                   help="Llama Guard 2 (11 categories, [INST] ... [/INST]) or 3 (14 categories, Llama 3 chat "
                        "headers); default 2, or what herd guard train recorded beside the checkpoint")
    p.add_argument("--categories", default=None, metavar="TOML",
                   help="a custom taxonomy: [[category]] tables with name and description, replacing the default")


def register(sub) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser(
        "guard", help="moderate a conversation with a Llama Guard model (also: guard prompt, guard train)",
        formatter_class=fmt,
        description="Classify the last message of a conversation (a JSON list of {\"role\", \"content\"}: user and\n"
                    "assistant turns in turn) with a guard model: any checkpoint llamaherd loads, such as\n"
                    "Meta-Llama-Guard-2-8B in HF or Meta layout, or one from herd guard train. Prints safe or unsafe,\n"
                    "the violated categories, and the score: the probability that the guard's answer starts with\n"
                    "'unsafe', which decides against --threshold. An answer the guard garbles is reported as such.\n\n"
                    "  herd guard prompt ...   print the guard prompt itself\n"
                    "  herd guard train ...    fine-tune a checkpoint into a guard for your taxonomy",
        epilog="examples:\n  herd guard Meta-Llama-Guard-2-8B --conversation chat.json\n"
               "  herd guard runs/guard --conversation chat.json --threshold 0.3 --json")
    p.add_argument("checkpoint", help="the guard model: a checkpoint or run directory")
    p.add_argument("--conversation", required=True, metavar="FILE", help="a JSON list of messages ('-': stdin)")
    p.add_argument("--threshold", type=float, default=0.5, help="unsafe when the score is at least this (0.5)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--device", default=None, help="cpu, cuda (default: cuda when available)")
    _prompt_options(p)
    p.set_defaults(func=cmd_guard)

    q = sub.add_parser(
        "guard-prompt", prog="herd guard prompt", formatter_class=fmt,
        description="Print the Llama Guard prompt for a conversation exactly, nothing added (no final newline):\n"
                    "byte for byte what Meta's reference code (llama-cookbook's build_default_prompt) renders. An\n"
                    "odd number of turns classifies the last user prompt, an even number the last agent response.",
        epilog="examples:\n  herd guard prompt --conversation chat.json\n"
               "  herd guard prompt --conversation chat.json --guard-version 3 --categories mine.toml --with-policy")
    q.add_argument("--conversation", required=True, metavar="FILE", help="a JSON list of messages ('-': stdin)")
    q.add_argument("--with-policy", action="store_true", help="each category's description under its name")
    _prompt_options(q)
    q.set_defaults(func=cmd_guard_prompt)

    t = sub.add_parser(
        "guard-train", prog="herd guard train", formatter_class=fmt,
        description="Fine-tune a checkpoint into a guard on labelled conversations, with the guard prompt itself:\n"
                    "JSONL (or Parquet) of {\"messages\": [...], \"label\": \"safe\" | \"unsafe\", \"categories\":\n"
                    "[\"S1\", ...]}. The SFT recipe's settings (override them as key=value), loss on the answer only;\n"
                    "a tenth held out, accuracy before and after in OUT/guard_result.json; the prompt's version\n"
                    "and taxonomy are kept beside it (OUT/guard.json) for herd guard and herd serve --guard.\n"
                    "Running it again on the same --out resumes.",
        epilog="example:\n  herd guard train runs/tiny --data labelled.jsonl --categories mine.toml --out runs/guard "
               "train.steps=200")
    t.add_argument("base", help="the checkpoint to start from")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. train.steps=200")
    t.add_argument("--data", action="append", required=True, metavar="FILE", help="labelled conversations; repeat")
    t.add_argument("--out", required=True, help="output directory")
    t.add_argument("--recipe", default="sft", help="a built-in recipe or a .toml path (default: sft)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    _prompt_options(t)
    t.set_defaults(func=cmd_guard_train)
    _register_cyberseceval(sub)
    _register_codeshield(sub)


def _conversation(path: str) -> list:
    import json
    import sys
    from pathlib import Path

    from llamaherd.errors import HerdError

    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise HerdError(f"{path}: file not found") from None
    try:
        messages = json.loads(text)
    except json.JSONDecodeError as e:
        raise HerdError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if isinstance(messages, dict) and "messages" in messages:
        messages = messages["messages"]
    return messages


def _settings(args, checkpoint: str | None = None) -> tuple[int, list | None]:
    """The prompt's version and categories: the flags, else what herd guard train recorded, else Guard 2's."""
    from llamaherd.safety.guard import load_categories
    from llamaherd.safety.guard_train import guard_settings

    found = guard_settings(checkpoint) if checkpoint else None
    version = args.guard_version or (found["version"] if found else 2)
    if args.categories:
        return version, load_categories(args.categories)
    return version, (found["categories"] if found else None)


def cmd_guard_prompt(args) -> int:
    import sys

    from llamaherd.safety.guard import guard_prompt

    version, categories = _settings(args)
    sys.stdout.write(guard_prompt(_conversation(args.conversation), version, categories, args.with_policy))
    sys.stdout.flush()
    return 0


def cmd_guard(args) -> int:
    import json

    from llamaherd.safety.guard import Guard

    messages = _conversation(args.conversation)
    version, categories = _settings(args, args.checkpoint)
    guard = Guard(args.checkpoint, version=version, categories=categories, threshold=args.threshold,
                  device=args.device)
    result = guard.classify(messages)
    if args.json:
        print(json.dumps(result))
        return 0
    names = {f"S{i}": c.name.strip().rstrip(".") for i, c in enumerate(guard.categories, 1)}
    line = result["verdict"]
    if result["categories"]:
        line += "  " + ", ".join(f"{c} ({names.get(c, '?')})" for c in result["categories"])
    print(f"{line}\nscore {result['score']:.4f} (threshold {args.threshold})")
    if result["malformed"]:
        print(f"the guard's answer was malformed: {result['output']!r}")
    return 0


def cmd_guard_train(args) -> int:
    from rich.console import Console

    from llamaherd.config import load_config
    from llamaherd.safety.guard_train import train_guard

    version, categories = _settings(args)
    cfg = load_config(args.recipe, args.overrides)
    console = Console(stderr=True)
    r = train_guard(args.base, args.data, cfg, args.out, version=version, categories=categories,
                    progress=not args.no_progress, console=console)
    print(f"held-out accuracy {r['base_heldout_accuracy']:.3f} -> {r['heldout_accuracy']:.3f} on {r['heldout']} "
          f"conversations; guard: {r['checkpoint']}")
    return 0


def _register_cyberseceval(sub) -> None:
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


# a file's extension names its language when --language is not given (Markdown and text are scanned by fence)
EXTENSIONS = {".py": "python", ".c": "c", ".h": "c", ".cpp": "cpp", ".cc": "cpp", ".cxx": "cpp", ".hpp": "cpp",
              ".js": "javascript", ".mjs": "javascript", ".cjs": "javascript", ".jsx": "javascript",
              ".ts": "javascript", ".tsx": "javascript", ".java": "java", ".php": "php", ".rs": "rust",
              ".cs": "csharp"}


def _register_codeshield(sub) -> None:
    from llamaherd.safety.codeshield import LANGUAGES

    p = sub.add_parser(
        "codeshield", help="scan model output for insecure code (Code Shield)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Find insecure code in a model's output before it reaches a user: each fenced block of a\n"
                    "Markdown answer (or the whole text, when it has no fence) is scanned by regex rules of its\n"
                    "language, and Python also by syntax-tree checks. Each issue has a rule id, a CWE, a line of\n"
                    "the input and a severity; any error means treatment 'block', only warnings 'warn', none\n"
                    f"'ignore'. Languages: {', '.join(LANGUAGES)} (a fence's info string, --language, the file's\n"
                    "extension, or a guess from the content, in that order).",
        epilog="examples:\n"
               "  herd codeshield answer.md\n"
               "  herd codeshield app.py --json\n"
               "  curl -s http://127.0.0.1:8000/v1/chat/completions -d @req.json | jq -r '.choices[0].message.content'"
               " \\\n      | herd codeshield - --exit-code\n"
               "  herd codeshield snippet.txt --language cpp\n"
               "exit status: 0 after a scan (with --exit-code: 1 when the code is insecure); 2 for an error.")
    p.add_argument("file", nargs="?", default="-", help="a text or source file; - or nothing reads standard input")
    p.add_argument("--language", default=None,
                   help="the code's language for blocks whose fence names none (default: the file's extension, "
                        "else guessed per block)")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    p.add_argument("--exit-code", action="store_true", help="exit with status 1 when the code is insecure")
    p.set_defaults(func=cmd_codeshield)


def read_input(path: str) -> str:
    """The text of ``path``, or of standard input for ``-``; HerdError for a missing, unreadable or binary file."""
    import sys
    from pathlib import Path

    from llamaherd.errors import HerdError

    if path == "-":
        return sys.stdin.read()
    file = Path(path)
    if not file.is_file():
        what = "is a directory" if file.is_dir() else "no such file"
        raise HerdError(f"{path}: {what}; expected a text file of model output or source code, or - for stdin")
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise HerdError(f"{path}: not UTF-8 text; expected a text file of model output or source code") from None


def cmd_codeshield(args) -> int:
    import json
    from pathlib import Path

    from llamaherd.safety.codeshield import scan_code

    language = args.language
    if language is None and args.file != "-":
        language = EXTENSIONS.get(Path(args.file).suffix.lower())
    result = scan_code(read_input(args.file), language=language)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result, "stdin" if args.file == "-" else args.file)
    return 1 if args.exit_code and result["is_insecure"] else 0


def print_table(result: dict, source: str) -> None:
    """The issues as a rich table, then one line: the treatment, the count, the languages scanned."""
    import sys

    from rich.console import Console
    from rich.table import Table

    out = Console(file=sys.stdout)
    if not out.is_terminal:
        out = Console(file=sys.stdout, width=140)
    colour = {"block": "red", "warn": "yellow", "ignore": "green"}[result["recommended_treatment"]]
    if result["issues"]:
        table = Table(title=f"herd codeshield {source}", title_justify="left")
        for name, style in (("line", "cyan"), ("severity", None), ("rule", "bold"), ("CWE", None),
                            ("description", None)):
            table.add_column(name, style=style, no_wrap=name != "description", justify="right" if name == "line"
                             else "left")
        for i in result["issues"]:
            sev = f"[{'red' if i['severity'] == 'error' else 'yellow'}]{i['severity']}[/]"
            table.add_row(str(i["line"]), sev, i["rule"], i["cwe"], i["description"])
        out.print(table)
    blocks = result["scanned_blocks"]
    languages = ", ".join(dict.fromkeys(b["language"] or "unknown" for b in blocks)) or "nothing to scan"
    out.print(f"[{colour}]{result['recommended_treatment']}[/]: {len(result['issues'])} issue(s) in "
              f"{len(blocks)} block(s) ({languages})")
