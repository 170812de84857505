"""`herd tokenizer ...`: encode and decode from the command line."""

from __future__ import annotations

import argparse
import importlib
import sys

from llamaherd.errors import HerdError

# modules that add more `herd tokenizer` subcommands, each with an `add_command(subparsers)` function
SUBCOMMAND_MODULES: list[str] = ["llamaherd.tokenizer.train"]


def register(sub: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """Add the `tokenizer` command group; returns its subparsers so more commands can be added."""
    fmt = argparse.ArgumentDefaultsHelpFormatter
    group = sub.add_parser("tokenizer", help="encode, decode (and train) Llama 3 tokenizers", formatter_class=fmt)
    group.set_defaults(func=lambda args: group.print_help() or 2)
    tsub = group.add_subparsers(dest="tokenizer_command", metavar="SUBCOMMAND")
    path_help = "tiktoken rank file (tokenizer.model), tokenizer.json, or a directory holding one"
    no_default = argparse.SUPPRESS  # for options whose absence the help text explains

    enc = tsub.add_parser("encode", help="print the token ids of a text", formatter_class=fmt)
    enc.add_argument("--tokenizer", required=True, metavar="PATH", default=no_default, help=path_help)
    enc.add_argument("--text", default=no_default, help="text to encode; without it, standard input is read")
    enc.add_argument("--bos", action="store_true", help="prepend <|begin_of_text|>")
    enc.add_argument("--eos", action="store_true", help="append <|end_of_text|>")
    enc.add_argument("--allow-special", action="store_true", help="read special-token strings as special tokens")
    enc.set_defaults(func=_encode)

    dec = tsub.add_parser("decode", help="print the text of token ids", formatter_class=fmt)
    dec.add_argument("--tokenizer", required=True, metavar="PATH", default=no_default, help=path_help)
    dec.add_argument("ids", nargs="*", metavar="ID", default=no_default, help="token ids; without them, stdin is read")
    dec.set_defaults(func=_decode)

    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).add_command(tsub)
    return tsub


def _encode(args: argparse.Namespace) -> int:
    from llamaherd.tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    text = args.text if "text" in args else sys.stdin.read()
    ids = tok.encode(text, bos=args.bos, eos=args.eos, allowed_special="all" if args.allow_special else set())
    print(" ".join(map(str, ids)))
    return 0


def _decode(args: argparse.Namespace) -> int:
    from llamaherd.tokenizer import load_tokenizer

    words = args.ids if "ids" in args else sys.stdin.read().split()
    try:
        ids = [int(w) for w in words]
    except ValueError:
        bad = next(w for w in words if not w.lstrip("-").isdigit())
        raise HerdError(f"decode: {bad!r} is not a token id (expected integers)") from None
    print(load_tokenizer(args.tokenizer).decode(ids))
    return 0
