"""The heuristic filters on one CPU core: llamaherd's stages against datatrove's filters, same documents.

gopher_quality, gopher_repetition, c4_quality and fineweb_quality against datatrove's GopherQualityFilter,
GopherRepetitionFilter, C4QualityFilter and FineWebQualityFilter (English, default parameters), called
document by document (datatrove's ``filter()``, without its pipeline's bookkeeping). Before timing, both
sides decide every document and the decisions must agree on at least 99% of them (reasons are reported).

The documents: the mixed corpus of tests/curate_corpus.py (674 documents, 1.8 MB: standard library
docstrings and modules, web-like articles, lists, spam, boilerplate, 23 languages, posts, short and
odd texts), or with ``--corpus stdlib`` the embedded stdlib corpus's documents (code and prose, each
cut to 20,000 characters). The issue measured datatrove on 1,327 Debian documents, which are not
available offline; the ratios here are on these documents.

Our stages split each whitespace-free chunk of text into words once and cache the result. Two rows
per stage: "cold", the caches emptied before every round (every distinct chunk of the corpus is split
again: what a worker pays the first time it meets a chunk), and "warm", the caches kept (every chunk
already split: the steady state of a worker far into a large shard, an upper bound here since the same
documents come back). datatrove's spaCy tokenizer keeps no cache (it runs in a memory zone).

The process is pinned to one core; the contenders of a stage run in turn, round after round, the
order reversed every other round; medians, and ratios as the median of per-round ratios.

    python benchmarks/cpu_filters.py                     # about 2 minutes on one core
    python benchmarks/cpu_filters.py --stages c4_quality --reps 3
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib.metadata import version

from common import ROOT, fmt_table, interleaved, machine, paired_ratio, print_machine, stats, write_json

from llamaherd.data.curate import text as T
from llamaherd.data.curate.base import Record
from llamaherd.data.curate.c4_quality import C4Quality
from llamaherd.data.curate.fineweb_quality import FineWebQuality
from llamaherd.data.curate.gopher_quality import GopherQuality
from llamaherd.data.curate.gopher_repetition import GopherRepetition

sys.path.insert(0, str(ROOT / "tests"))  # the corpus the parity test uses
from curate_corpus import MAX_CHARS, _cut, mixed_corpus  # noqa: E402

STAGES = {"gopher_quality": (GopherQuality, "GopherQualityFilter"),
          "gopher_repetition": (GopherRepetition, "GopherRepetitionFilter"),
          "c4_quality": (C4Quality, "C4QualityFilter"),
          "fineweb_quality": (FineWebQuality, "FineWebQualityFilter")}
TARGET = 10.0  # the target: >= 10x datatrove's documents/s per core, each filter


def corpus(name: str, max_docs: int | None) -> list[tuple[str, str]]:
    if name == "mixed":
        docs = mixed_corpus()
    else:
        from llamaherd.data.stdlib_corpus import stdlib_documents

        docs = [(d.id, _cut(d.text, MAX_CHARS)) for d in stdlib_documents("all", kinds=("code", "prose"))]
    return docs[:max_docs] if max_docs else docs


def ours_run(stage, docs):
    def run():
        return [stage(Record(id=i, text=t, source="bench")) for i, t in docs]
    return run


def datatrove_run(twin, docs):
    from datatrove.data import Document

    def run():
        out = []
        for i, t in docs:
            r = twin.filter(Document(text=t, id=i))
            out.append(None if r is True else r[1])
        return out
    return run


def cold(run):
    def call():
        T.clear_caches()
        return run()
    return call


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", choices=["mixed", "stdlib"], default="mixed")
    p.add_argument("--max-docs", type=int, default=None, help="the first N documents only")
    p.add_argument("--stages", nargs="+", choices=list(STAGES), default=list(STAGES))
    p.add_argument("--reps", type=int, default=5, help="timed rounds (each runs every contender once)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--core", type=int, default=None, help="the core to pin to (default: the first allowed)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    a = p.parse_args()
    try:
        import datatrove.pipeline.filters as dt
    except ImportError:
        sys.exit("error: datatrove is not installed (pip install -e '.[dev]')")
    if hasattr(os, "sched_setaffinity"):
        core = a.core if a.core is not None else min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {core})

    info = machine()
    info.update(datatrove=version("datatrove"), spacy=version("spacy"), numpy=version("numpy"),
                pinned_cores=sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None)
    print_machine(info)
    docs = corpus(a.corpus, a.max_docs)
    chars = sum(len(t) for _, t in docs)
    print(f"corpus: {a.corpus}, {len(docs)} documents, {chars / 1e6:.2f} M characters")

    result = {"benchmark": "cpu_filters", "machine": info, "config": vars(a),
              "corpus": {"name": a.corpus, "documents": len(docs), "characters": chars}, "results": {}}
    rows = []
    for name in a.stages:
        cls, twin_name = STAGES[name]
        stage, twin = cls(), getattr(dt, twin_name)()
        ours, theirs = ours_run(stage, docs), datatrove_run(twin, docs)
        # honesty check: the same decisions before any timing
        mine, ref = cold(ours)(), theirs()
        same = sum((x is None) == (y is None) for x, y in zip(mine, ref))
        same_reason = sum(x == y for x, y in zip(mine, ref))
        kept = sum(y is None for y in ref)
        print(f"\n{name}: decisions agree on {same}/{len(docs)}, reasons on {same_reason}/{len(docs)} "
              f"(datatrove keeps {kept})")
        if same < 0.99 * len(docs):
            sys.exit(f"error: {name} agrees with datatrove on fewer than 99% of the documents")
        times = interleaved({"datatrove": theirs, "ours cold": cold(ours), "ours warm": ours},
                            reps=a.reps, warmup=a.warmup)
        r = {"decisions_agree": same, "reasons_agree": same_reason, "datatrove_keeps": kept, "seconds": times}
        base = stats(times["datatrove"])["median"]
        row = [name, f"{len(docs) / base:.0f}"]
        for which in ("ours cold", "ours warm"):
            s, ratio = stats(times[which]), paired_ratio(times["datatrove"], times[which])
            r[which] = {"docs_per_s": len(docs) / s["median"], "speedup": ratio}
            row += [f"{len(docs) / s['median']:.0f}", f"{ratio['median']:.1f}x ({ratio['min']:.1f}-{ratio['max']:.1f})"]
        r["datatrove_docs_per_s"] = len(docs) / base
        rows.append(row + [f"{same}/{same_reason}/{len(docs)}"])
        result["results"][name] = r

    print()
    print(fmt_table(["stage", "datatrove docs/s", "ours cold docs/s", "cold vs datatrove (paired)", "ours warm docs/s",
                     "warm vs datatrove (paired)", "decisions/reasons agree"], rows))
    print(f"\n1 core, {a.reps} paired rounds, {a.corpus} corpus; target >= {TARGET:.0f}x each (issue), cold caches:")
    for name, r in result["results"].items():
        x = r["ours cold"]["speedup"]["median"]
        print(f"  {name}: {x:.1f}x {'met' if x >= TARGET else 'NOT met'}")
    write_json(a.out, result)


if __name__ == "__main__":
    main()
