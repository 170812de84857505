"""The last step of benchmarks/gpu_all.sh: every step's JSON merged into one, and one table of the GPU-speed targets.

    python benchmarks/gpu_summary.py --dir bench-out --out bench-out/all.json

Reads DIR/steps.tsv (name, exit status or "skipped", seconds: one line a step, as gpu_all.sh writes it) and
DIR/<name>.json for each step, writes one JSON ({"machine", "steps": {name: {"exit_status", "seconds",
"result"}}, "targets": [...]}) and prints one table: each target with what was measured, the best peer of the
same run, and whether it is met. Standard library only; a step that did not run or wrote nothing leaves its
targets "unmeasured", never an error.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

TRAIN_TFLOPS = 495.0  # llama3.2-1b shape, seq 2,048 and 8,192 with document masks: 50% of the dense bf16 peak
DECODE_BF16 = 170.0  # llama3-8b shape, bf16, batch 1, on an H100 ...
DECODE_INT8 = 300.0  # ... and int8 weight-only
H100_CEILING = 186.0  # tok/s: an H100's copy bandwidth / the llama3-8b shape's bf16 weights; the targets scale by it


def read_steps(folder: Path) -> dict[str, dict]:
    """Each step of steps.tsv with its exit status, seconds and JSON (None when it wrote none or bad JSON)."""
    steps: dict[str, dict] = {}
    table = folder / "steps.tsv"
    for line in table.read_text().splitlines() if table.is_file() else []:
        parts = line.split("\t")
        if len(parts) != 3:
            continue
        name, status, seconds = parts
        result = None
        path = folder / f"{name}.json"
        if path.is_file():
            try:
                result = json.loads(path.read_text())
            except ValueError:
                result = None
        steps[name] = {"exit_status": None if status == "skipped" else int(status), "skipped": status == "skipped",
                       "seconds": float(seconds), "result": result}
    return steps


def _results(steps: dict, name: str) -> dict:
    result = (steps.get(name) or {}).get("result") or {}
    return result.get("results") or {}


def _pick(results: dict, prefix: str, key: str) -> float | None:
    """``key`` of the first contender whose name starts with ``prefix`` (None: absent or failed)."""
    for name, r in results.items():
        if name.startswith(prefix) and isinstance(r, dict) and isinstance(r.get(key), (int, float)):
            return float(r[key])
    return None


def _best_peer(results: dict, key: str) -> tuple[str, float] | None:
    peers = [(n, float(r[key])) for n, r in results.items()
             if not n.startswith("llamaherd") and isinstance(r, dict) and isinstance(r.get(key), (int, float))]
    return max(peers, key=lambda p: p[1]) if peers else None


def targets(steps: dict) -> list[dict]:
    """The issue's targets, each {"target", "measured", "goal", "unit", "met", "peer", "peer_value", "note"}."""
    rows = []

    def add(target, measured, goal, unit, peer=None, note=""):
        met = None if measured is None or goal is None else measured >= goal
        rows.append({"target": target, "measured": measured, "goal": goal, "unit": unit, "met": met,
                     "peer": peer[0] if peer else None, "peer_value": peer[1] if peer else None, "note": note})

    for step, seq in (("gpu_train", "2,048"), ("gpu_train_8k", "8,192")):
        res = _results(steps, step)
        flex = next((r.get("tflops") for n, r in res.items()  # the plain variant: no float8, no checkpointing
                     if n.startswith("llamaherd compiled + flex") and n.endswith("docs/row)")), None)
        add(f"train 1B, seq {seq}, document masks", flex, TRAIN_TFLOPS, "TFLOP/s", _best_peer(res, "tflops"))
    variants = _results(steps, "gpu_train_variants")
    for suffix, what in (("float8", "float8 linears"), ("selective AC", "selective activation checkpointing")):
        value = next((r.get("tflops") for n, r in variants.items() if n.endswith(suffix)), None)
        add(f"train 1B, seq 2,048, document masks, {what}", value, None, "TFLOP/s", None, "report only")
    decode = (steps.get("gpu_decode") or {}).get("result") or {}
    ceiling = decode.get("ceiling_tok_per_s")
    scale = ceiling / H100_CEILING if isinstance(ceiling, (int, float)) and ceiling > 0 else None
    note = "" if scale is None else (f"targets x{scale:.2f}: copy-bandwidth ceiling {ceiling:.0f} tok/s "
                                     f"vs H100 {H100_CEILING:.0f}")
    res = decode.get("results") or {}
    add("decode 8B bf16, batch 1", _pick(res, "llamaherd", "tok_per_s_median"),
        DECODE_BF16 * scale if scale else None, "tok/s", _best_peer(res, "tok_per_s_median"), note)
    quant = _results(steps, "gpu_quant")
    peer = _pick(quant, "torchao-int8", "tok_per_s_median")
    add("decode 8B int8, batch 1", _pick(quant, "int8", "tok_per_s_median"), DECODE_INT8 * scale if scale else None,
        "tok/s", None if peer is None else ("torchao-int8", peer), note)
    batch = (decode.get("batch_results") or {}).get("64") or {}
    add("decode 8B bf16, batch 64", batch.get("tok_per_s_median"), None, "tok/s", None, "report only")
    mem = ((steps.get("gpu_memory") or {}).get("result") or {}).get("results") or {}
    peak = mem.get("peak_gib")
    plan = mem.get("plan_gib")
    rows.append({"target": "train 8B, seq 8,192, one 80 GB GPU: peak", "measured": peak, "goal": 80 * 0.98,
                 "unit": "GiB", "met": None if peak is None else peak < 80 * 0.98, "peer": None, "peer_value": None,
                 "note": "" if plan is None else f"memory model {plan:.1f} GiB"})
    for r in rows:
        if r["goal"] is None and r["note"] != "report only" and r["measured"] is not None:
            r["note"] = (r["note"] + "; " if r["note"] else "") + "no copy-bandwidth measurement to scale the target"
    return rows


def fmt(x, spec=".1f") -> str:
    return "-" if x is None else format(x, spec)


def goal(row: dict) -> str:
    if row["goal"] is None:
        return "-"
    return f"< {row['goal']:.1f}" if row["unit"] == "GiB" else f">= {row['goal']:.0f}"  # memory: lower is better


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", required=True, help="the folder gpu_all.sh wrote")
    p.add_argument("--out", required=True, help="the one JSON to write")
    a = p.parse_args()
    folder = Path(a.dir)
    steps = read_steps(folder)
    machine = next((s["result"]["machine"] for s in steps.values()
                    if isinstance(s["result"], dict) and "machine" in s["result"]), None)
    rows = targets(steps)
    Path(a.out).write_text(json.dumps({"machine": machine, "steps": steps, "targets": rows}, indent=2) + "\n")
    met = {True: "yes", False: "NO", None: "unmeasured"}
    print(table(["target", "measured", "goal", "best peer (same run)", "met", "note"],
                [[r["target"], f"{fmt(r['measured'])} {r['unit']}" if r["measured"] is not None else "-",
                  goal(r),
                  f"{r['peer']}: {r['peer_value']:.1f}" if r["peer"] else "-",
                  met[r["met"]] if r["goal"] is not None or r["measured"] is None else "reported", r["note"]]
                 for r in rows]))
    failed = [n for n, s in steps.items() if s["exit_status"] not in (0, None)]
    skipped = [n for n, s in steps.items() if s["skipped"]]
    print(f"steps: {len(steps) - len(failed) - len(skipped)} ok" + (f", failed: {', '.join(failed)}" if failed else "")
          + (f", skipped: {', '.join(skipped)}" if skipped else "") + f"; wrote {a.out}")


if __name__ == "__main__":
    main()
