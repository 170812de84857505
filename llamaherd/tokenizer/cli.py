"""`herd tokenizer ...`: encode, decode and train tokenizers from the command line."""

from __future__ import annotations

import argparse
import sys
import time

from llamaherd.data.cli import add_input_argument
from llamaherd.errors import HerdError


def register(sub: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """Add the `tokenizer` command group; returns its subparsers so more commands can be added."""
    fmt = argparse.ArgumentDefaultsHelpFormatter
    group = sub.add_parser("tokenizer", help="encode, decode and train Llama 3 tokenizers", formatter_class=fmt)
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

    p = tsub.add_parser("train", help="train a byte-level BPE tokenizer (Llama 3 pre-split) on raw text",
                        description="Train a byte-level BPE with Llama 3's pre-split regex on raw text and write "
                                    "it as a tiktoken rank file; the 256 Llama 3 special tokens come after the ranks.",
                        formatter_class=fmt)
    add_input_argument(p)
    p.add_argument("--vocab-size", type=int, default=8192, help="BPE ranks; the model adds 256 special tokens")
    p.add_argument("--out", default="tokenizer.model", help="tiktoken rank file to write")
    p.add_argument("--max-bytes", type=int, default=None, help="train on at most this many bytes of text")
    p.add_argument("--min-frequency", type=int, default=2, help="merge only pairs seen at least this often")
    p.set_defaults(func=_train)
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


def _train(args: argparse.Namespace) -> int:
    from llamaherd.data.sources import read_documents
    from llamaherd.tokenizer.train import capped_texts, save_ranks, train_bpe

    if args.max_bytes is not None and args.max_bytes < 1:
        raise HerdError(f"--max-bytes {args.max_bytes}: expected a positive number of bytes")
    docs = read_documents(args.input, text_field=args.text_field)
    counter: dict = {}
    start = time.perf_counter()
    ranks = train_bpe(capped_texts(docs, args.max_bytes, counter), args.vocab_size, args.min_frequency)
    seconds = time.perf_counter() - start
    save_ranks(ranks, args.out)
    mb = counter["bytes"] / 1e6
    short = f" (the corpus ran out of merges before {args.vocab_size})" if len(ranks) < args.vocab_size else ""
    print(
        f"{args.out}: {len(ranks):,} ranks{short} from {mb:.2f} MB in {counter['documents']:,} documents, "
        f"{seconds:.1f} s ({mb / max(seconds, 1e-9):.2f} MB/s)"
    )
    return 0
