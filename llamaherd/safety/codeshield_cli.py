"""`herd codeshield [FILE | -]`: scan a model's output (Markdown or plain code) for insecure code."""

from __future__ import annotations

import argparse

# a file's extension names its language when --language is not given (Markdown and text are scanned by fence)
EXTENSIONS = {".py": "python", ".c": "c", ".h": "c", ".cpp": "cpp", ".cc": "cpp", ".cxx": "cpp", ".hpp": "cpp",
              ".js": "javascript", ".mjs": "javascript", ".cjs": "javascript", ".jsx": "javascript",
              ".ts": "javascript", ".tsx": "javascript", ".java": "java", ".php": "php", ".rs": "rust",
              ".cs": "csharp"}


def register(sub) -> None:
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
