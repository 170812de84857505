"""`herd data ...`: clean raw text, pack documents into token shards, inspect a packed dataset."""

from __future__ import annotations

import argparse

from llamaherd.data.curate.pipeline import available_stages
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
        "curate",
        help="the curation pipeline: filters, dedup, PII; kept/, removed/ and stats.json",
        description="Run raw text through curation stages in order and write what they keep and what they remove\n"
        "(with the stage and reason) as JSONL shards, plus per-stage counts. A pipeline recipe is TOML:\n"
        "[[stages]] tables, each with a name and its parameters, and an [output] table (compression,\n"
        "shard_docs). Without a recipe or --stages, every available stage runs with its defaults.\n"
        "Running the same command again on the same --out resumes where it stopped.",
        epilog="examples:\n"
        "  herd data curate --input data/*.jsonl.zst --out curated --stages normalize,gopher_quality,exact_dedup\n"
        "  herd data curate my-pipeline.toml --input stdlib --out curated gopher_quality.min_doc_words=20 \\\n"
        "      output.compression=zstd --workers 4",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("recipe", nargs="?", default=None, metavar="RECIPE", help="pipeline recipe (a .toml path)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="stage.param=value or output.key=value, e.g. c4_quality.filter_no_terminal_punct=false")
    add_input_argument(p, required=True)
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (kept/, removed/, stats.json)")
    p.add_argument("--stages", default=None, metavar="a,b,c", help="run these stages, in this order, with their "
                   "defaults (instead of the recipe's); available: " + ", ".join(available_stages()))
    p.add_argument("--workers", type=int, default=0, help="worker processes (0: one per core)")
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local: a process pool on this machine; ray: Ray tasks (a local Ray, or --ray-address)")
    p.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="a Ray cluster to run on (its nodes must share the --out directory's filesystem)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_curate)

    p = data_sub.add_parser(
        "stats",
        help="a curation's per-stage table, and DIR/report.md with plots",
        description="Print the per-stage table of a finished curation (herd data curate) and write DIR/report.md "
        "with plots: removal reasons per stage, document lengths before and after, language shares and domain "
        "mix when stages recorded them (plots need matplotlib).",
        formatter_class=_FMT,
    )
    p.add_argument("dir", metavar="DIR", help="the --out directory of herd data curate")
    p.set_defaults(func=cmd_stats)

    p = data_sub.add_parser(
        "annotate",
        help="label documents with an LLM judge (for the quality and domain classifiers)",
        description="Ask an LLM, a checkpoint llamaherd loads or an OpenAI-compatible endpoint, to label each "
        "document with a stored prompt, and write the labelled documents as JSONL {id, source, text, label, "
        "answer}. Shipped prompts: edu_quality (a 0-5 educational score) and domain (code, math, prose, "
        "other_language); any prompt TOML works.",
        epilog="examples: herd data annotate --judge runs/tiny --prompt edu_quality --input docs.jsonl "
        "--out labels.jsonl; herd data annotate --judge http://localhost:8000/v1 --prompt domain ...",
        formatter_class=_FMT,
    )
    p.add_argument("--judge", required=True, metavar="CKPT_OR_URL",
                   help="a checkpoint (any layout llamaherd loads) or an OpenAI-compatible base URL (.../v1)")
    p.add_argument("--judge-model", default=None, help="the endpoint's model name (default: its first model)")
    p.add_argument("--prompt", required=True, help="a shipped prompt (edu_quality, domain) or a prompt .toml file")
    add_input_argument(p, required=True)
    p.add_argument("--out", required=True, metavar="FILE", help="labels JSONL to write (replaced atomically)")
    p.add_argument("--max-docs", type=int, default=None, help="label at most this many documents")
    p.add_argument("--device", default=None, help="for a checkpoint judge: cpu, cuda, ... (default: cuda if any)")
    p.set_defaults(func=cmd_annotate)

    p = data_sub.add_parser(
        "train-classifier",
        help="train a fast n-gram classifier on labels (for the quality and domain stages)",
        description="Train a hashed word 1-2-gram TF-IDF linear model with scikit-learn on labelled documents "
        "(herd data annotate's output): a regression when the labels are numbers (quality scores), a logistic "
        "classification otherwise (domains). Reports held-out accuracy and AUC, then refits on everything.",
        formatter_class=_FMT,
    )
    p.add_argument("--labels", required=True, metavar="FILE", help="labelled JSONL (text and label fields)")
    p.add_argument("--out", required=True, metavar="DIR", help="classifier directory to write")
    p.add_argument("--label-field", default="label", help="the JSONL field holding the label")
    p.add_argument("--cut", type=float, default=3.0, help="for scores: the AUC tells scores >= cut from the rest")
    p.add_argument("--test-fraction", type=float, default=0.2, help="held out to measure the classifier")
    p.add_argument("--seed", type=int, default=0, help="seeds the held-out split")
    p.set_defaults(func=cmd_train_classifier)

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


def cmd_curate(args: argparse.Namespace) -> int:
    from rich.console import Console

    from llamaherd.data.curate.pipeline import curate, load_pipeline
    from llamaherd.data.curate.report import StageProgress

    if args.recipe is not None and "=" in args.recipe:  # `herd data curate a.b=1 --input ...`: an override
        args.overrides.insert(0, args.recipe)
        args.recipe = None
    if args.workers < 0:
        raise HerdError(f"--workers {args.workers}: expected 0 (one per core) or more")
    stages = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages is not None else None
    pipeline = load_pipeline(args.recipe, stages, args.overrides)
    console = Console(stderr=True)
    with StageProgress(not args.no_progress, console) as progress:
        stats = curate(pipeline, args.input, args.out, text_field=args.text_field, workers=args.workers,
                       executor=args.executor, ray_address=args.ray_address, progress=progress)
    print_curate_stats(stats, Console())
    return 0


def print_curate_stats(stats: dict, console) -> None:
    """The per-stage table of a curation's stats.json."""
    from rich.table import Table

    table = Table(title="curation", show_lines=False)
    for column in ("stage", "in", "kept", "removed (by reason)", "MB in", "MB kept", "seconds"):
        table.add_column(column, justify="left" if column in ("stage", "removed (by reason)") else "right")
    for s in stats["stages"]:
        docs, size = s["documents"], s["bytes"]
        reasons = ", ".join(f"{r} {n:,}" for r, n in docs["removed"].items()) or "-"
        table.add_row(s["name"], f"{docs['in']:,}", f"{docs['kept']:,}", reasons, f"{size['in'] / 1e6:.2f}",
                      f"{size['kept'] / 1e6:.2f}", f"{s['seconds']:.1f}")
    console.print(table)
    skipped = stats["input"]["skipped"]
    if skipped["count"]:
        first = skipped["lines"][0]
        console.print(f"skipped {skipped['count']:,} malformed input record(s), e.g. {first['error']}",
                      highlight=False, markup=False, soft_wrap=True)
    out = stats["output"]
    console.print(f"kept {out['kept']['documents']:,} of {stats['input']['documents']:,} documents "
                  f"({out['kept']['bytes'] / 1e6:.2f} MB) in {out['shards']} shard(s); {stats['seconds']:.1f} s",
                  highlight=False)


def cmd_stats(args: argparse.Namespace) -> int:
    from rich.console import Console

    from llamaherd.data.curate.report import load_stats, write_report

    print_curate_stats(load_stats(args.dir), Console())
    print(f"wrote {write_report(args.dir)}")
    return 0


def cmd_annotate(args: argparse.Namespace) -> int:
    from llamaherd.data.curate.annotate import annotate, load_prompt
    from llamaherd.data.sources import read_documents
    from llamaherd.eval.judge import make_judge

    if args.max_docs is not None and args.max_docs < 1:
        raise HerdError(f"--max-docs {args.max_docs}: expected a number >= 1")
    prompt = load_prompt(args.prompt)
    docs = read_documents(args.input, text_field=args.text_field)
    judge = make_judge(args.judge, model=args.judge_model, max_tokens=prompt.max_tokens, device=args.device)
    result = annotate(docs, judge, prompt, args.out, max_docs=args.max_docs)
    labels = ", ".join(f"{k} {v:,}" for k, v in result["labels"].items()) or "none"
    print(f"wrote {args.out}: {result['labelled']:,} of {result['asked']:,} documents labelled ({labels})")
    if result["unparsed"]:
        print(f"{result['unparsed']:,} replies had no label, e.g. {result['unparsed_examples'][0]!r}")
    return 0


def cmd_train_classifier(args: argparse.Namespace) -> int:
    from llamaherd.data.curate.classifier import read_labels, train_classifier

    if not 0 < args.test_fraction < 1:
        raise HerdError(f"--test-fraction {args.test_fraction}: expected a fraction between 0 and 1")
    texts, labels = read_labels(args.labels, label_field=args.label_field)
    info = train_classifier(texts, labels, args.out, cut=args.cut, test_fraction=args.test_fraction, seed=args.seed)
    m = info["metrics"]
    shown = ", ".join(f"{k} {v:.3f}" for k, v in m.items() if isinstance(v, float))
    print(f"wrote {args.out}: {info['kind']} on {info['examples']:,} examples, labels {', '.join(info['labels'])}; "
          f"held out {m['held_out']:,}: {shown}")
    return 0


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
