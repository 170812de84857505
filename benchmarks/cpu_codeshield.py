"""Code Shield latency and accuracy: llamaherd's `scan_code` against Meta's `codeshield` (`CodeShield.scan_code`).

The inputs: the labelled snippets of tests/data/codeshield_labelled.jsonl (8 languages, insecure and safe,
many inside Markdown answers), and "typical outputs": answers of 500-2,000 characters built from them (a line of
prose, then one to three snippets, each fenced with its language and followed by a sentence), labelled insecure
when any of their snippets is.

Both sides scan every input as an assistant's reply would be scanned: without being told the language (ours finds
the fences and guesses per block; Meta's then runs the rules of all eight of its languages, regex first and semgrep
where a pre-scan pattern matches). Meta's is also run given each snippet's true language (snippets only; a
typical output can hold several languages). Each call is timed on its own, one after the other (Meta's async call
through ``asyncio.run``); the contenders alternate input by input, the order reversed every round.

Reported per contender: p50 and p99 latency in milliseconds over all timed calls, recall (insecure inputs
flagged / insecure inputs) and precision (flagged inputs that are insecure / flagged inputs).

    python benchmarks/cpu_codeshield.py --json codeshield.json    # about 1 minute on 2 cores
    python benchmarks/cpu_codeshield.py --quick                   # 1 round, 40 inputs
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from importlib.metadata import version

from common import ROOT, fmt_table, machine, print_machine, write_json

from llamaherd.safety import scan_code

LABELLED = ROOT / "tests" / "data" / "codeshield_labelled.jsonl"
PROSE = ["Here is one way to do it.", "Sure, this should work for your case:", "Try the following approach."]
AFTER = ["Adjust the names to fit your project.", "This keeps the example short.", "Let me know if it helps."]


def snippets() -> list[dict]:
    return [json.loads(line) for line in LABELLED.read_text().splitlines() if line.strip()]


def typical_outputs(rows: list[dict], n: int, seed: int = 0) -> list[dict]:
    """``n`` answers of 500-2,000 characters, each from one to three snippets with prose around them."""
    rng, out = random.Random(seed), []
    while len(out) < n:
        picked = rng.sample(rows, rng.randint(1, 3))
        parts = [rng.choice(PROSE)]
        for r in picked:
            parts.append(r["code"] if "```" in r["code"] else f"```{r['language']}\n{r['code'].rstrip()}\n```")
            parts.append(rng.choice(AFTER))
        text = "\n\n".join(parts)
        if 500 <= len(text) <= 2000:
            label = "insecure" if any(r["label"] == "insecure" for r in picked) else "safe"
            out.append({"id": f"typical-{len(out):03d}", "language": None, "label": label, "code": text})
    return out


def contenders() -> dict:
    """name -> (scan function returning is_insecure, whether it needs a known language)."""
    out = {"llamaherd": (lambda row: scan_code(row["code"])["is_insecure"], False)}
    try:
        from codeshield.cs import CodeShield
        from codeshield.insecure_code_detector.languages import Language
    except ImportError:
        print("Meta's codeshield is not installed (pip install codeshield==1.0.1): measuring ours only")
        return out

    def meta(row, given: bool) -> bool:
        language = Language(row["language"]) if given else None
        return asyncio.run(CodeShield.scan_code(row["code"], language)).is_insecure

    out["codeshield"] = (lambda row: meta(row, False), False)
    out["codeshield+lang"] = (lambda row: meta(row, True), True)
    return out


def run(inputs: list[dict], fns: dict, rounds: int) -> dict:
    """Latencies (seconds) and verdicts per contender, alternating contenders input by input."""
    times = {name: [] for name in fns}
    verdicts = {name: {} for name in fns}
    for fn, needs_language in fns.values():  # warm up: imports, rule compilation, semgrep's first start
        if not needs_language or inputs[0]["language"]:
            fn(inputs[0])
    for rnd in range(rounds):
        order = list(fns) if rnd % 2 == 0 else list(reversed(fns))
        for row in inputs:
            for name in order:
                fn, needs_language = fns[name]
                if needs_language and row["language"] is None:
                    continue
                t0 = time.perf_counter()
                verdicts[name][row["id"]] = fn(row)
                times[name].append(time.perf_counter() - t0)
    return {"times": times, "verdicts": verdicts}


def accuracy(verdicts: dict[str, bool], inputs: list[dict]) -> dict:
    rows = [r for r in inputs if r["id"] in verdicts]
    tp = sum(verdicts[r["id"]] and r["label"] == "insecure" for r in rows)
    fp = sum(verdicts[r["id"]] and r["label"] == "safe" for r in rows)
    positives = sum(r["label"] == "insecure" for r in rows)
    return {"n": len(rows), "tp": tp, "fp": fp, "fn": positives - tp,
            "recall": tp / positives if positives else None, "precision": tp / (tp + fp) if tp + fp else None}


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--typical", type=int, default=60, help="typical outputs built from the snippets")
    p.add_argument("--rounds", type=int, default=2, help="timed passes over all inputs")
    p.add_argument("--quick", action="store_true", help="1 round over 20 snippets and 20 typical outputs")
    p.add_argument("--json", default=None, metavar="OUT", help="write every measurement as JSON here")
    a = p.parse_args()
    info = machine()
    print_machine(info)
    rows = snippets()
    typical = typical_outputs(rows, a.typical)
    if a.quick:
        rows, typical, a.rounds = random.Random(1).sample(rows, 20), typical[:20], 1
    fns = contenders()
    result = {"benchmark": "cpu_codeshield", "machine": info, "config": vars(a),
              "versions": {"codeshield": _version("codeshield"), "semgrep": _version("semgrep")}, "sets": {}}
    table = []
    for set_name, inputs in (("snippets", rows), ("typical", typical)):
        measured = run(inputs, fns, a.rounds)
        result["sets"][set_name] = {}
        for name in fns:
            ts = measured["times"][name]
            if not ts:
                continue
            acc = accuracy(measured["verdicts"][name], inputs)
            chars = statistics.median(len(r["code"]) for r in inputs)
            entry = {"p50_ms": 1000 * percentile(ts, 0.5), "p99_ms": 1000 * percentile(ts, 0.99),
                     "calls": len(ts), "median_chars": chars, **acc}
            result["sets"][set_name][name] = entry
            table.append([set_name, name, acc["n"], int(chars), f"{entry['p50_ms']:.2f}", f"{entry['p99_ms']:.2f}",
                          _fmt(acc["recall"]), _fmt(acc["precision"]), f"{acc['tp']}/{acc['fp']}/{acc['fn']}"])
    print(f"codeshield {result['versions']['codeshield']}, semgrep {result['versions']['semgrep']}")
    print(fmt_table(["inputs", "contender", "n", "median chars", "p50 ms", "p99 ms", "recall", "precision",
                     "tp/fp/fn"], table))
    for set_name, entries in result["sets"].items():
        if "codeshield" in entries:
            ratio = entries["codeshield"]["p50_ms"] / entries["llamaherd"]["p50_ms"]
            print(f"{set_name}: Meta's p50 / ours = {ratio:.0f}x")
    write_json(a.json, result)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _version(name: str) -> str | None:
    try:
        return version(name)
    except Exception:
        return None


if __name__ == "__main__":
    main()
