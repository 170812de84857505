"""MinHash deduplication end to end on CPU: time, peak memory and bytes per document, at growing sizes.

For each size N, a synthetic corpus of N documents (~150 words drawn from a Zipf-distributed
vocabulary of 100,000 words, as natural text is; 10% of them near copies of an earlier document with
one word in 150 changed) is written as JSONL, then `herd data curate --stages minhash_dedup` runs on it
in a fresh process, with the default 14 bands x 8 rows. Reported: wall time of the run, documents/s,
the peak resident memory of the main process (which holds every document's band hashes while it
plans; the workers, which hold one shard at a time, are not counted), bytes per document of the main
process's peak over a baseline process that only imports llamaherd, and the share of planted copies
caught (the LSH formula predicts
~100% at their similarity of ~0.93). Memory should grow linearly with N: the bytes per document stay
flat.

    python benchmarks/cpu_minhash.py                       # 25k, 50k, 100k documents: ~5 minutes on 2 cores
    python benchmarks/cpu_minhash.py --sizes 10000 --workers 1
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import ROOT, fmt_table, machine, print_machine, write_json

# the peak resident set of this process since it started (VmHWM; ru_maxrss would include the parent's
# pages from before exec)
PEAK = "int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])"
CHILD = """
import json, sys, time
from llamaherd.data.curate.pipeline import curate, load_pipeline
src, out, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
t0 = time.perf_counter()
stats = curate(load_pipeline(stages=["minhash_dedup"]), [src], out, workers=workers)
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "stats": stats,
                  "main_peak_kib": PEAK}))
""".replace("PEAK", PEAK)
BASELINE = """
import json
import llamaherd.data.curate.pipeline, llamaherd.data.curate.minhash_dedup
print(json.dumps({"main_peak_kib": PEAK}))
""".replace("PEAK", PEAK)


def write_corpus(path: Path, n: int, seed: int = 0) -> set[str]:
    """N documents, 10% near copies of an earlier one; returns the ids of the copies."""
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, 100_001)
    cdf = np.cumsum(1.0 / ranks**1.1)
    cdf /= cdf[-1]
    vocab = np.array([f"w{i}" for i in range(100_000)])

    def draw(k: int) -> np.ndarray:
        return vocab[np.minimum(np.searchsorted(cdf, rng.random(k)), len(vocab) - 1)]

    copies, docs = set(), []
    with open(path, "w") as f:
        for i in range(n):
            if i > 10 and rng.random() < 0.1:
                words = docs[int(rng.integers(0, len(docs)))].copy()
                words[int(rng.integers(0, len(words)))] = draw(1)[0]
                copies.add(f"d{i}")
            else:
                words = draw(int(rng.integers(100, 200)))
                docs.append(words)
                if len(docs) > 5000:  # copies come from the recent past; keeps this generator's memory flat
                    docs.pop(0)
            f.write(json.dumps({"id": f"d{i}", "text": " ".join(words)}) + "\n")
    return copies


def run_child(code: str, *args) -> dict:
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=3600)
    if proc.returncode:
        sys.exit(f"error: the child process failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="25000,50000,100000", help="comma-separated document counts")
    p.add_argument("--workers", type=int, default=0, help="worker processes (0: one per core)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    a = p.parse_args()
    info = machine()
    print_machine(info)
    sizes = [int(s) for s in a.sizes.split(",")]
    base = run_child(BASELINE)["main_peak_kib"]
    rows, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            src = Path(tmp) / f"corpus_{n}.jsonl"
            t0 = time.perf_counter()
            copies = write_corpus(src, n)
            print(f"{n:,} documents ({src.stat().st_size / 1e6:.0f} MB) written in {time.perf_counter() - t0:.0f} s",
                  flush=True)
            r = run_child(CHILD, src, Path(tmp) / f"out_{n}", a.workers)
            removed = set()
            for shard in sorted((Path(tmp) / f"out_{n}" / "removed").iterdir()):
                removed |= {json.loads(line)["id"] for line in shard.read_text().splitlines()}
            caught = len(copies & removed) / max(len(copies), 1)
            per_doc = (r["main_peak_kib"] - base) * 1024 / n
            results.append({"documents": n, "seconds": r["seconds"], "docs_per_s": n / r["seconds"],
                            "main_peak_mib": r["main_peak_kib"] / 1024,
                            "baseline_mib": base / 1024, "bytes_per_document": per_doc, "copies": len(copies),
                            "copies_caught": caught, "removed": len(removed)})
            rows.append([f"{n:,}", f"{r['seconds']:.1f}", f"{n / r['seconds']:,.0f}",
                         f"{r['main_peak_kib'] / 1024:.0f}", f"{per_doc:,.0f}",
                         f"{caught:.1%}", f"{len(removed) - len(copies & removed)}"])
            src.unlink()
    print()
    print(fmt_table(["documents", "seconds", "docs/s", "main peak MiB", "bytes/doc (main)", "copies caught",
                     "other removed"], rows))
    print(f"baseline (imports only): {base / 1024:.0f} MiB")
    write_json(a.out, {"benchmark": "cpu_minhash", "machine": info, "config": vars(a), "results": results})


if __name__ == "__main__":
    main()
