"""`herd guard`: Llama Guard prompts, moderation by a guard model, and training a guard."""

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
