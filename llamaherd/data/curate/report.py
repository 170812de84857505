"""`herd data stats DIR`: a curation's per-stage table, and DIR/report.md with its plots.

    report.md        the table of stats.json (documents and bytes in / kept / removed by reason, seconds)
    removals.png     documents removed by each stage, by reason
    lengths.png      document lengths (characters) of everything read and of what was kept
    languages.png    language shares of the kept documents (when a stage recorded meta.language)
    domains.png      domain mix of the kept documents (when a stage recorded meta.domain)

Plots need matplotlib (the ``plot`` extra); without it the report has the tables only.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from llamaherd.data.curate.pipeline import read_records
from llamaherd.errors import HerdError


def load_stats(out_dir: str | Path) -> dict:
    path = Path(out_dir) / "stats.json"
    if not path.is_file():
        raise HerdError(f"{path}: not found; {out_dir} is not a finished curation (run herd data curate)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise HerdError(f"{path}: not valid JSON ({e})") from None


def _shards(out: Path, part: str):
    for path in sorted((out / part).iterdir()) if (out / part).is_dir() else []:
        yield from read_records(path)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _bar_chart(plt, path: Path, counts: Counter, title: str, xlabel: str) -> Path:
    items = counts.most_common(15)
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(items) + 1.2), dpi=100)
    ax.barh([k for k, _ in items][::-1], [v for _, v in items][::-1])
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


class StageProgress:
    """A rich progress bar per segment of stages (units of work = shards), as ``curate`` reports them."""

    def __init__(self, enabled: bool, console):
        self.bar = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("shards"), TimeElapsedColumn(), console=console)
        self.tasks: dict[str, int] = {}

    def __enter__(self):
        if self.bar is not None:
            self.bar.__enter__()
            return self
        return None

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def __call__(self, label: str, done: int, total: int | None) -> None:
        if label not in self.tasks:
            self.tasks[label] = self.bar.add_task(label, total=total)
        self.bar.update(self.tasks[label], completed=done, total=total)


def stats_table(stats: dict) -> list[str]:
    """stats.json's stages as the lines of a markdown table (documents and bytes in / kept / removed, seconds)."""
    lines = ["| stage | in | kept | removed (by reason) | MB in | MB kept | seconds |",
             "|---|---:|---:|---|---:|---:|---:|"]
    for s in stats["stages"]:
        docs, size = s["documents"], s["bytes"]
        reasons = ", ".join(f"{r} {n:,}" for r, n in docs["removed"].items()) or "-"
        lines.append(f"| {s['name']} | {docs['in']:,} | {docs['kept']:,} | {reasons} | {size['in'] / 1e6:.2f} | "
                     f"{size['kept'] / 1e6:.2f} | {s['seconds']:.1f} |")
    return lines


def write_report(out_dir: str | Path) -> Path:
    """DIR/report.md (and its plots, with matplotlib) from DIR/stats.json and the kept/ and removed/ shards."""
    out = Path(out_dir)
    stats = load_stats(out)
    lengths_all, lengths_kept = [], []
    languages, domains = Counter(), Counter()
    for record in _shards(out, "kept"):
        lengths_kept.append(len(record["text"]))
        lengths_all.append(len(record["text"]))
        meta = record.get("meta") or {}
        if "language" in meta:
            languages[str(meta["language"])] += 1
        if "domain" in meta:
            domains[str(meta["domain"])] += 1
    for record in _shards(out, "removed"):
        lengths_all.append(len(record["text"]))

    lines = [f"# Curation of `{out.name}`", "", *stats_table(stats)]
    read, kept = stats["input"], stats["output"]["kept"]
    lines += ["", f"Read {read['documents']:,} documents ({read['bytes'] / 1e6:.2f} MB); kept {kept['documents']:,} "
              f"({kept['bytes'] / 1e6:.2f} MB); {read['skipped']['count']:,} malformed input records skipped."]
    lines += [f"- {item['error']}" for item in read["skipped"]["lines"][:10]]

    plt = _pyplot()
    if plt is not None:
        removals = Counter({f"{s['name']}: {r}": n for s in stats["stages"]
                            for r, n in s["documents"]["removed"].items()})
        if removals:
            _bar_chart(plt, out / "removals.png", removals, "documents removed, by stage and reason", "documents")
            lines += ["", "![removals](removals.png)"]
        if lengths_all:
            import numpy as np

            fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
            bins = np.logspace(0, np.log10(max(lengths_all) + 1), 40)
            ax.hist([max(n, 1) for n in lengths_all], bins=bins, alpha=0.6, label="read")
            ax.hist([max(n, 1) for n in lengths_kept], bins=bins, alpha=0.6, label="kept")
            ax.set_xscale("log")
            ax.set_xlabel("document length (characters)")
            ax.set_ylabel("documents")
            ax.legend()
            fig.tight_layout()
            fig.savefig(out / "lengths.png")
            plt.close(fig)
            lines += ["", "![document lengths](lengths.png)"]
        for counts, name, title in ((languages, "languages", "language shares of the kept documents"),
                                    (domains, "domains", "domain mix of the kept documents")):
            if counts:
                _bar_chart(plt, out / f"{name}.png", counts, title, "documents")
                lines += ["", f"![{name}]({name}.png)"]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
