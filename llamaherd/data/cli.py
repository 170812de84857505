"""`herd data ...`: clean raw text, pack documents into token shards, inspect a packed dataset."""

from __future__ import annotations

import argparse

from llamaherd.data.pack import DEFAULT_SHARD_TOKENS
from llamaherd.data.prepare import MAX_CHARS, MIN_CHARS
from llamaherd.errors import HerdError

_FMT = argparse.ArgumentDefaultsHelpFormatter


def add_input_argument(parser, required: bool = False) -> None:
    """The ``--input`` and ``--text-field`` options every command that reads raw text shares."""
    kw = {"required": True} if required else {"default": ["stdlib"]}
    parser.add_argument("--input", nargs="+", metavar="INPUT", **kw,
                        help="files (.txt/.jsonl/.parquet, optionally .gz/.zst), directories, globs, "
                             "or stdlib[:train|val]")
    parser.add_argument("--text-field", default="text", help="JSONL field / Parquet column holding the text")


def register(sub) -> None:
    data = sub.add_parser("data", help="prepare training data: clean, pack, inspect", formatter_class=_FMT)
    data.set_defaults(func=lambda args: data.print_help() or 2)
    data_sub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND")

    p = data_sub.add_parser(
        "pack",
        help="tokenize documents into sharded token files for pretraining",
        description="Tokenize documents (each as bos + tokens + eos) and pack them into shard_*.bin token "
        "files with a document index and meta.json. The output appears only once the pack is complete.",
        formatter_class=_FMT,
    )
    p.add_argument("--tokenizer", required=True, metavar="PATH", help="tokenizer file")
    add_input_argument(p, required=True)
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--threads", type=int, default=0, help="tokenizer threads; 0: one per core")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="most tokens per shard")
    p.add_argument("--overwrite", action="store_true", help="replace a packed dataset already in --out")
    p.add_argument("--quiet", action="store_true", help="no progress messages")
    p.set_defaults(func=cmd_pack)

    p = data_sub.add_parser("inspect", help="show a packed dataset's metadata", formatter_class=_FMT)
    p.add_argument("dir", metavar="DIR", help="packed dataset directory")
    p.set_defaults(func=cmd_inspect)

    p = data_sub.add_parser(
        "clean",
        help="read raw text, drop empty/short/long/duplicate documents, write JSONL",
        description="Read raw text and write the documents that are not empty, too short, too long or exact "
        "duplicates as JSONL records {id, text, source}; print how many were removed, by reason.",
        formatter_class=_FMT,
    )
    add_input_argument(p)
    p.add_argument("--out", required=True, help="JSONL file to write (replaced atomically)")
    p.add_argument("--min-chars", type=int, default=MIN_CHARS, help="drop documents shorter than this")
    p.add_argument("--max-chars", type=int, default=MAX_CHARS, help="drop documents longer than this")
    p.add_argument("--max-docs", type=int, default=None, help="stop after keeping this many documents")
    p.set_defaults(func=cmd_clean)


def cmd_clean(args: argparse.Namespace) -> int:
    from llamaherd.data.clean import clean_documents
    from llamaherd.data.prepare import check_limits, write_jsonl
    from llamaherd.data.sources import read_documents

    check_limits(args.min_chars, args.max_chars)
    if args.max_docs is not None and args.max_docs < 0:
        raise HerdError(f"--max-docs {args.max_docs}: expected a number >= 0")
    docs = read_documents(args.input, text_field=args.text_field)
    kept, stats = clean_documents(docs, args.min_chars, args.max_chars, max_docs=args.max_docs)
    write_jsonl(kept, args.out)
    print(stats.table())
    print(f"wrote {args.out}: {stats.kept:,} documents, {stats.kept_bytes / 1e6:.2f} MB")
    return 0


def cmd_pack(args) -> int:
    from llamaherd.data.pack import pack_documents
    from llamaherd.data.sources import read_documents
    from llamaherd.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_file(args.tokenizer)
    pack_documents(
        read_documents(args.input, text_field=args.text_field),
        tokenizer,
        args.out,
        shard_tokens=args.shard_tokens,
        num_threads=args.threads,
        tokenizer_file=args.tokenizer,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    return 0


def cmd_inspect(args) -> int:
    from llamaherd.data.pack import PackedDataset

    ds = PackedDataset(args.dir)
    mean = ds.n_tokens / max(ds.n_docs, 1)
    print(f"dataset     {ds.path}")
    print(f"tokens      {ds.n_tokens:,}")
    print(f"docs        {ds.n_docs:,} (mean {mean:,.1f} tokens, longest {int(ds.doc_len.max()):,})")
    print(f"dtype       {ds.dtype.name}")
    print(f"vocab size  {ds.vocab_size:,} (bos {ds.bos_id}, eos {ds.eos_id})")
    print(f"tokenizer   sha256 {ds.meta.get('tokenizer_sha256') or 'not recorded'}")
    print(f"shards      {len(ds.shards)}")
    for s in ds.meta["shards"]:
        print(f"  {s['file']}  {s['n_tokens']:,} tokens  {s['n_docs']:,} docs")
    return 0
