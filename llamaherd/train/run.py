"""The main job, `herd run`: raw text -> a small Llama 3, end to end, in one run directory.

    corpus -> curation -> BPE tokenizer -> tokenize + pack -> pretrain -> validate -> samples -> report

    runs/NAME/
        config.toml         the resolved recipe (`herd pretrain runs/NAME/config.toml` continues it)
        data_settings.json  what the cached corpus/tokenizer/data were made with (checked on reuse)
        corpus/             raw.jsonl (validation + training text within the length limits, each record's
                            split in meta), the curated train.jsonl / val.jsonl, and the counts
        curation/           `herd data curate`'s output for raw.jsonl with the recipe's curate.stages:
                            kept/, removed/ (every removed document with its stage and reason), stats.json,
                            report.md and its plots
        tokenizer.model     the trained BPE (tiktoken format, Llama 3 specials appended)
        data/train, data/val  packed token shards
        checkpoints/        step_NNNNNNN/ (loadable with llamaherd.load("runs/NAME"))
        metrics.jsonl, loss.png, report.md

Every stage writes its output atomically and is skipped when that output is already there, so
running the same command again resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llamaherd.config import RunConfig, load_config
from llamaherd.errors import HerdError


@dataclass
class RunSummary:
    run_dir: Path
    stages: list = field(default_factory=list)  # (stage, seconds, what)
    corpus: dict = field(default_factory=dict)
    tokenizer: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    train: object = None
    unigram_bpb: float | None = None
    samples: list = field(default_factory=list)


def _read_jsonl_texts(path: Path):
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)["text"]


def stage_corpus(cfg: RunConfig, run_dir: Path) -> dict:
    """Read, cap and length-limit the raw text into corpus/raw.jsonl: validation first, then training,
    each record tagged with its split (what curation reads; without curation stages, the corpus)."""
    from llamaherd.data.clean import clean_documents
    from llamaherd.data.sources import read_documents

    out = run_dir / "corpus"
    stats_file = out / "clean_stats.json"
    if stats_file.is_file() and (out / "raw.jsonl").is_file():
        return json.loads(stats_file.read_text())
    out.mkdir(parents=True, exist_ok=True)
    stats = {}
    tmp = out / f".raw.jsonl.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for split, inputs in (("val", cfg.data.val_inputs), ("train", cfg.data.inputs)):
                if not inputs:
                    continue
                docs = read_documents(inputs, cfg.data.text_field)
                if split == "train" and cfg.data.max_bytes:
                    docs = _cap(docs, cfg.data.max_bytes)
                kept, s = clean_documents(docs, cfg.data.min_chars, cfg.data.max_chars, dedup=False)
                for doc in kept:
                    record = {"id": f"{split}:{doc.id}", "text": doc.text, "source": doc.source,
                              "meta": {"split": split}}
                    f.write(json.dumps(record, ensure_ascii=False) + "\n")
                if s.kept == 0:
                    key = "inputs" if split == "train" else "val_inputs"
                    raise HerdError(f"data.{key}: no document is within the length limits ({s.read} read, "
                                    f"removed: {dict(s.removed) or 'none'}); the corpus is empty")
                stats[split] = s.as_dict()
        os.replace(tmp, out / "raw.jsonl")
    finally:
        tmp.unlink(missing_ok=True)
    stats_file.write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def stage_curate(cfg: RunConfig, run_dir: Path, pipeline, progress: bool, console) -> dict:
    """Curate corpus/raw.jsonl into curation/ (kept/, removed/, stats.json, report.md), then write what was
    kept, split by split, to corpus/{train,val}.jsonl; returns each split's documents and bytes read, kept,
    and removed by reason (length limits and curation stages together: read = kept + removed)."""
    from llamaherd.data.curate.pipeline import curate, read_records
    from llamaherd.data.curate.report import StageProgress, write_report

    corpus, cur = run_dir / "corpus", run_dir / "curation"
    summary_file = corpus / "corpus_stats.json"
    if summary_file.is_file():
        return json.loads(summary_file.read_text())
    clean = json.loads((corpus / "clean_stats.json").read_text())
    summary = {split: {"read": s["read"], "read_bytes": s["read_bytes"], "kept": 0, "kept_bytes": 0,
                       "removed": dict(s["removed"])} for split, s in clean.items()}
    if pipeline is not None:
        with StageProgress(progress, console) as bar:
            curate(pipeline, [corpus / "raw.jsonl"], cur, workers=cfg.curate.workers, progress=bar)
        write_report(cur)
        kept = (r for path in sorted((cur / "kept").iterdir()) for r in read_records(path))
        for path in sorted((cur / "removed").iterdir()):
            for r in read_records(path):
                removed = summary[r["meta"]["split"]]["removed"]
                reason = f"{r['stage']}: {r['reason']}"
                removed[reason] = removed.get(reason, 0) + 1
    else:
        kept = read_records(corpus / "raw.jsonl")
    files = {split: open(corpus / f".{split}.jsonl.tmp-{os.getpid()}", "w", encoding="utf-8") for split in summary}
    try:
        for r in kept:
            split = r["meta"]["split"]  # curated records keep their first source in meta
            doc = {"id": r["id"], "text": r["text"], "source": r["meta"].get("source", r["source"])}
            files[split].write(json.dumps(doc, ensure_ascii=False) + "\n")
            summary[split]["kept"] += 1
            summary[split]["kept_bytes"] += len(r["text"].encode())
    finally:
        for f in files.values():
            f.close()
    for split, f in files.items():
        if summary[split]["kept"] == 0:
            Path(f.name).unlink()
            key = "inputs" if split == "train" else "val_inputs"
            raise HerdError(f"data.{key}: no document survived curation (removed: {summary[split]['removed']}); "
                            "the corpus is empty")
        os.replace(f.name, corpus / f"{split}.jsonl")
    summary_file.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _cap(docs, max_bytes: int):
    total = 0
    for doc in docs:
        total += len(doc.text.encode())
        if total > max_bytes:
            return
        yield doc


def stage_tokenizer(cfg: RunConfig, run_dir: Path, progress: bool) -> dict:
    from llamaherd.tokenizer import Tokenizer
    from llamaherd.tokenizer.train import save_ranks, train_bpe

    target = run_dir / "tokenizer.model"
    if not target.is_file():
        if cfg.tokenizer.path:
            src = meta_tokenizer_file() if cfg.tokenizer.path == "meta" else Path(cfg.tokenizer.path)
            Tokenizer.from_file(src)  # validate before copying
            shutil.copyfile(src, target)
        else:
            start = time.perf_counter()
            n_bytes = (run_dir / "corpus" / "train.jsonl").stat().st_size
            ranks = train_bpe(_read_jsonl_texts(run_dir / "corpus" / "train.jsonl"), cfg.tokenizer.vocab_size,
                              progress=progress)
            save_ranks(ranks, target)
            secs = time.perf_counter() - start
            (run_dir / "tokenizer_stats.json").write_text(json.dumps({"seconds": secs, "bytes": n_bytes}) + "\n")
    tok = Tokenizer.from_file(target)
    info = {"n_words": tok.n_words, "ranks": len(tok.mergeable_ranks)}
    stats = run_dir / "tokenizer_stats.json"
    if stats.is_file():
        s = json.loads(stats.read_text())
        info["mb_per_s"] = s["bytes"] / 1e6 / s["seconds"] if s["seconds"] else None
    return info


def meta_tokenizer_file() -> Path:
    """Meta's Llama 3 tokenizer.model, as shipped in the llama-models package."""
    try:
        import llama_models
    except ImportError:
        raise HerdError("tokenizer.path = \"meta\" needs the llama-models package (pip install llama-models)") from None
    path = Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"
    if not path.is_file():
        raise HerdError(f"{path}: Meta's tokenizer file is missing from the llama-models package")
    return path


def stage_pack(cfg: RunConfig, run_dir: Path, progress: bool) -> dict:
    from llamaherd.data.pack import PackedDataset, pack_documents
    from llamaherd.tokenizer import Tokenizer

    tok = Tokenizer.from_file(run_dir / "tokenizer.model")
    out = {}
    for split in ("train", "val"):
        src, dst = run_dir / "corpus" / f"{split}.jsonl", run_dir / "data" / split
        if not src.is_file():
            continue
        if not (dst / "meta.json").is_file():
            pack_documents(_read_jsonl_texts(src), tok, dst, tokenizer_file=run_dir / "tokenizer.model",
                           overwrite=True, progress=progress)
        ds = PackedDataset(dst)
        out[split] = {"tokens": ds.n_tokens, "docs": ds.n_docs}
    return out


def unigram_bits_per_byte(dataset, tokenizer, n_bytes: int) -> float:
    """Entropy of the corpus's token unigram distribution, in bits per byte of text.

    Counted over the tokens a model predicts (everything but each document's begin-of-text token),
    so it compares directly with the model's validation loss in bits per byte.
    """
    counts = np.zeros(dataset.vocab_size, dtype=np.int64)
    for shard in dataset.shards:
        counts += np.bincount(np.asarray(shard), minlength=dataset.vocab_size)[: dataset.vocab_size]
    counts[dataset.bos_id] = 0
    p = counts[counts > 0] / counts.sum()
    bits_per_token = float(-(p * np.log2(p)).sum())
    return bits_per_token * int(counts.sum()) / n_bytes


def stage_samples(cfg: RunConfig, run_dir: Path) -> list[tuple[str, str]]:
    import torch

    from llamaherd.checkpoint import load
    from llamaherd.generation import generate, prepare_for_decoding

    model, tok = load(run_dir)
    prepare_for_decoding(model)
    out = []
    for i, prompt in enumerate(cfg.sample.prompts):
        ids = tok.encode(prompt, bos=True)
        new = generate(model, [ids], max_new_tokens=cfg.sample.max_new_tokens, temperature=cfg.sample.temperature,
                       top_p=cfg.sample.top_p, seed=cfg.sample.seed + i, stop_tokens=tok.stop_tokens)[0]
        out.append((prompt, tok.decode([t for t in new if t not in tok.stop_tokens])))
    del torch
    return out


def plot_losses(run_dir: Path) -> Path | None:
    """loss.png: training loss per step and validation loss; None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from llamaherd.train.metrics import MetricsLog

    records = MetricsLog(run_dir / "metrics.jsonl").read()
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = run_dir / "loss.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(s: RunSummary, cfg: RunConfig) -> Path:
    t = s.train
    train_data = s.data.get("train", {})
    lines = [
        f"# Run `{s.run_dir.name}`",
        "",
        "## Corpus",
        "",
        "| split | documents read | kept | kept MB | tokens |",
        "|---|---:|---:|---:|---:|",
    ]
    for split in ("train", "val"):
        c = s.corpus.get(split)
        if c:
            lines.append(f"| {split} | {c['read']:,} | {c['kept']:,} | {c['kept_bytes'] / 1e6:.2f} | "
                         f"{s.data.get(split, {}).get('tokens', 0):,} |")
    removed: dict = {}
    for c in s.corpus.values():
        for reason, n in c.get("removed", {}).items():
            removed[reason] = removed.get(reason, 0) + n
    if removed:  # the length limits' reasons first, then "stage: reason" of the curation stages
        lines += ["", "Removed by the length limits (`data.min_chars`, `data.max_chars`) and the curation stages: "
                  + ", ".join(f"{k} {v:,}" for k, v in sorted(removed.items(), key=lambda kv: ":" in kv[0]))]
    curation = s.run_dir / "curation"
    if (curation / "stats.json").is_file():
        from llamaherd.data.curate.report import load_stats, stats_table

        lines += ["", "## Curation", "", "The stages of `curate.stages`, on validation and training text together "
                  "(validation first, so a training document that repeats one is the one removed); every removed "
                  "document is in `curation/removed/` with its stage and reason, more plots in "
                  "[curation/report.md](curation/report.md).", "", *stats_table(load_stats(curation))]
        if (curation / "removals.png").is_file():
            lines += ["", "![documents removed by stage](curation/removals.png)"]
    mbps = s.tokenizer.get("mb_per_s")
    tok_line = f"{s.tokenizer['ranks']:,} BPE ranks + 256 special tokens = {s.tokenizer['n_words']:,} ids"
    if mbps:
        tok_line += f"; trained at {mbps:.1f} MB/s"
    train_bytes = s.corpus.get("train", {}).get("kept_bytes")
    if train_bytes and train_data.get("tokens"):
        tok_line += f"; {train_data['tokens'] / train_bytes:.3f} tokens per byte of training text"
    lines += ["", "## Tokenizer", "", tok_line + "."]
    lines += ["", "## Training", "",
              "| | |", "|---|---|",
              f"| steps | {t.step} / {t.steps} |",
              f"| tokens seen | {t.tokens_seen:,} |",
              f"| throughput | {t.tokens_per_s:,.0f} tokens/s |",
              f"| train loss (mean of the last {cfg.train.log_every} steps) | {t.train_loss:.4f} nats/token |"]
    if t.val_loss is not None:
        lines.append(f"| validation loss | {t.val_loss:.4f} nats/token = {t.val_bpb:.4f} bits/byte |")
    if s.unigram_bpb is not None:
        lines.append(f"| unigram entropy of the corpus | {s.unigram_bpb:.4f} bits/byte |")
    if t.goodput:
        g = t.goodput
        parts = ", ".join(f"{k[:-2]} {v:.1f} s" for k, v in g.items() if k.endswith("_s") and k != "wall_s" and v)
        lines.append(f"| goodput (effective training time) | {g['effective']:.1%} of {g['wall_s']:.1f} s ({parts}) |")
    if (s.run_dir / "loss.png").is_file():
        lines += ["", "![loss curve](loss.png)"]
    lines += ["", "## Samples", ""]
    for prompt, text in s.samples:
        lines += [f"Prompt `{prompt!r}`:", "", "```python", prompt + text, "```", ""]
    lines += ["## Stages", "", "| stage | seconds |", "|---|---:|"]
    lines += [f"| {name} | {secs:.1f} |" for name, secs, _ in s.stages]
    path = s.run_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


# what the cached corpus, tokenizer and packed data depend on: a run directory keeps them
_DATA_KEYS = {"data": ("inputs", "val_inputs", "text_field", "max_bytes", "min_chars", "max_chars"),
              "curate": ("stages",),
              "tokenizer": ("path", "vocab_size")}


def check_same_data(cfg: RunConfig, run_dir: Path) -> None:
    """Record the data settings of a new run; refuse to reuse a run directory made with other ones."""
    record = run_dir / "data_settings.json"
    mine = {f"{section}.{key}": getattr(getattr(cfg, section), key)
            for section, keys in _DATA_KEYS.items() for key in keys}
    if record.is_file():
        theirs = json.loads(record.read_text())
        changed = [f"{k} {theirs.get(k)!r} -> {v!r}" for k, v in mine.items() if theirs.get(k) != v]
        if changed:
            raise HerdError(f"{run_dir} was made with other data settings ({'; '.join(changed)}); "
                            "use another --out, or delete the run directory")
    else:
        record.write_text(json.dumps(mine, indent=2) + "\n")


def run(recipe: str | None = None, overrides: list[str] | None = None, out: str | None = None,
        progress: bool = True, console=None, nproc: int = 1) -> RunSummary:
    """Run the whole main job; returns what it did (the report is in ``run_dir/report.md``). With
    ``nproc`` > 1 the pretraining runs as that many processes under torchrun (``parallel.*``)."""
    from rich.console import Console

    from llamaherd.data.pack import PackedDataset
    from llamaherd.tokenizer import Tokenizer
    from llamaherd.train.pretrain import pretrain

    console = console or Console(stderr=True)
    cfg = load_config(recipe or "tiny", overrides)
    if cfg.curate.shard_docs < 1:
        raise HerdError(f"curate.shard_docs {cfg.curate.shard_docs}: expected 1 or more documents per unit of work")
    if nproc != 1:
        from llamaherd.train.pretrain import check_layout

        check_layout(cfg, nproc)
    pipeline = None
    if cfg.curate.stages:  # every stage and parameter checked before any work
        from llamaherd.data.curate.pipeline import pipeline_from_tables

        pipeline = pipeline_from_tables(cfg.curate.stages, {"shard_docs": cfg.curate.shard_docs}, "curate.stages")
    if cfg.curate.workers < 0:
        raise HerdError(f"curate.workers {cfg.curate.workers}: expected 0 (one per core) or more")
    run_dir = Path(out or Path("runs") / cfg.name)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise HerdError(f"run directory {run_dir} cannot be created: {e.strerror or e}") from None
    check_same_data(cfg, run_dir)
    summary = RunSummary(run_dir=run_dir)

    def stage(name: str, fn, *a):
        console.print(f"[bold cyan]▶ {name}[/]")
        start = time.perf_counter()
        result = fn(*a)
        summary.stages.append((name, time.perf_counter() - start, ""))
        return result

    stage("corpus", stage_corpus, cfg, run_dir)
    summary.corpus = stage("curation", stage_curate, cfg, run_dir, pipeline, progress, console)
    summary.tokenizer = stage("tokenizer", stage_tokenizer, cfg, run_dir, progress)
    summary.data = stage("tokenize + pack", stage_pack, cfg, run_dir, progress)
    cfg.data.train_dir, cfg.data.val_dir = str(run_dir / "data" / "train"), str(run_dir / "data" / "val")
    if "val" not in summary.data:
        cfg.data.val_dir = ""
    cfg.tokenizer.path = str(run_dir / "tokenizer.model")
    if nproc != 1:
        summary.train = stage("pretrain", _pretrain_processes, cfg, run_dir, nproc, progress)
    else:
        summary.train = stage("pretrain", lambda: pretrain(cfg, run_dir, progress=progress, console=console))
    if summary.train.stopped_by:
        return summary
    tok = Tokenizer.from_file(run_dir / "tokenizer.model")
    ds = PackedDataset(run_dir / "data" / "train")
    summary.unigram_bpb = unigram_bits_per_byte(ds, tok, summary.corpus["train"]["kept_bytes"])
    summary.samples = stage("samples", stage_samples, cfg, run_dir)
    plot_losses(run_dir)
    write_report(summary, cfg)
    return summary


def _pretrain_processes(cfg: RunConfig, run_dir: Path, nproc: int, progress: bool):
    """Pretrain as ``nproc`` torchrun processes on the recipe as resolved (``run_dir/config.toml``)."""
    from llamaherd.config import dump_config
    from llamaherd.train.pretrain import launch, read_result

    (run_dir / "config.toml").write_text(dump_config(cfg))
    (run_dir / "train_result.json").unlink(missing_ok=True)
    code = launch(run_dir / "config.toml", [], run_dir, nproc, progress)
    if code:
        raise HerdError(f"the {nproc} training processes failed (exit status {code}); see their output above. "
                        "Running the same command resumes from the newest good checkpoint")
    return read_result(run_dir)


def print_summary(s: RunSummary, console) -> None:
    from rich.table import Table

    t = s.train
    table = Table(title=f"herd run: {s.run_dir}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for name, secs, _ in s.stages:
        table.add_row(name, f"{secs:.1f} s")
    table.add_row("tokens seen", f"{t.tokens_seen:,} at {t.tokens_per_s:,.0f} tokens/s")
    table.add_row("train loss", f"{t.train_loss:.3f} nats/token")
    if t.val_loss is not None:
        table.add_row("validation", f"{t.val_loss:.3f} nats/token = {t.val_bpb:.3f} bits/byte")
    if s.unigram_bpb is not None:
        table.add_row("unigram entropy", f"{s.unigram_bpb:.3f} bits/byte")
    table.add_row("run directory", str(s.run_dir))
    table.add_row("report", str(s.run_dir / "report.md"))
    table.add_row("generate", f"herd generate {s.run_dir} --prompt 'def '")
    table.add_row("chat", f"herd chat {s.run_dir}")
    console.print(table)
    if s.samples:
        prompt, text = s.samples[0]
        console.print("[bold]sample:[/]")
        console.print(prompt + text, markup=False, highlight=False)

