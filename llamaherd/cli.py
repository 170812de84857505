"""`herd`: the command line. It parses arguments and calls library functions, nothing more.

Each area of the library registers its own subcommands (a ``register(subparsers)`` function in
its ``cli`` module), so this file stays a short list.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from llamaherd.errors import HerdError

# modules with a `register(subparsers)` function, in the order their commands are listed
COMMAND_MODULES = [
    "llamaherd.train.cli",  # run (the main job), pretrain, recipes
    "llamaherd.checkpoint.cli",  # convert, info, average
    "llamaherd.generation.cli",  # generate, chat
    "llamaherd.tokenizer.cli",  # tokenizer encode/decode/train
    "llamaherd.data.cli",  # data clean/pack/inspect
    "llamaherd.posttrain.cli",  # sft, rm, sample, dpo, ppo
    "llamaherd.serve.cli",  # serve
    "llamaherd.eval.cli",  # eval
    "llamaherd.safety.cli",  # guard, cyberseceval, codeshield
    "llamaherd.scaling.cli",  # scaling
]

# commands whose second word names one of their own: `herd eval code ...` runs the `eval-code` parser
SUBCOMMANDS = {("eval", "code"): "eval-code", ("eval", "decontaminate"): "eval-decontaminate",
               ("eval", "pairwise"): "eval-pairwise", ("guard", "prompt"): "guard-prompt",
               ("guard", "train"): "guard-train"}


def build_parser() -> argparse.ArgumentParser:
    from llamaherd import __version__

    parser = argparse.ArgumentParser(
        prog="herd",
        description="llamaherd: the Llama 3 system on PyTorch, from raw text to a guarded chat server.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"llamaherd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if tuple(argv[:2]) in SUBCOMMANDS:
        argv = [SUBCOMMANDS[tuple(argv[:2])], *argv[2:]]
    args, extra = parser.parse_known_args(argv)
    if extra:  # `key=value` overrides may also come after options: herd pretrain R --out D train.steps=3
        if not hasattr(args, "overrides") or any(x.startswith("-") or "=" not in x for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides += extra
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except HerdError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as e:
        # a path problem the library did not phrase itself: still one line, naming the file
        print(f"error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
