"""Pairwise preference evaluation: two models answer the same prompts, a judge model picks the better answer.

    herd eval pairwise --prompts builtin --a runs/tiny --b http://127.0.0.1:8000/v1 --judge JUDGE --out DIR

Meta compared Llama 3 with other models on prompts of 12 use cases, by human preference; here a judge model
stands in for the annotators. Each pair of answers is judged twice, A first and then B first, to cancel the
judge's preference for a position: the pair is a win for A only when both orders prefer A, a loss when both
prefer B, and a tie otherwise (a disagreement between the orders, a tie verdict, or an answer of the judge's
that names neither, which is also counted as ``unparsed``). Win, tie and loss rates per category and
overall, each with a 95% bootstrap interval (items resampled with replacement, seeded); a stacked
horizontal bar chart per category, as in Meta's figures; ``report.md`` and ``results.json``.

The built-in prompt set (``--prompts builtin``): 120 prompts written for this project, 10 in each category.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from llamaherd.errors import HerdError

CATEGORIES = ("asking for advice", "brainstorming", "classification", "closed question answering", "coding",
              "creative writing", "extraction", "inhabiting a character/persona", "open question answering",
              "reasoning", "rewriting", "summarization")
BUILTIN = Path(__file__).parent / "prompts" / "pairwise.jsonl"
JUDGE_PROMPT = (
    "You are comparing two assistants' answers to the same user request. Judge which answer is more helpful, "
    "correct and well written for the request.\n\n[User request]\n{prompt}\n\n[Answer 1]\n{first}\n\n"
    "[Answer 2]\n{second}\n\nReply with exactly one of: 1, 2, tie.")


def load_prompts(path: str | Path) -> list[dict]:
    """``{"category", "prompt"}`` records; a one-line error naming the line for a bad one."""
    from llamaherd.data.records import read_records

    path = BUILTIN if str(path) == "builtin" else Path(path)
    out = []
    for where, r in read_records(path):
        for field in ("category", "prompt"):
            if not isinstance(r.get(field), str) or not r[field].strip():
                raise HerdError(f"{where}: expected a non-empty string {field!r}")
        out.append({"category": r["category"], "prompt": r["prompt"]})
    if not out:
        raise HerdError(f"{path}: no prompts")
    return out


def parse_verdict(reply: str) -> str | None:
    """'1', '2' or 'tie' from a judge's reply (its first such word), None when it names none."""
    m = re.search(r"\b(1|2|tie)\b", reply.strip().lower())
    return m.group(1) if m else None


def combine(first: str | None, second: str | None) -> str:
    """A's result from the verdicts with A shown first and with B shown first: win, loss or tie."""
    a_first = {"1": "win", "2": "loss"}.get(first or "", "tie")
    b_first = {"2": "win", "1": "loss"}.get(second or "", "tie")
    return a_first if a_first == b_first else "tie"


def judge_pairs(judge, prompts: list[dict], answers_a: list[str], answers_b: list[str]) -> list[dict]:
    """Each prompt's answers judged in both orders; records with both raw replies and the outcome for A."""
    convs = []
    for p, a, b in zip(prompts, answers_a, answers_b, strict=True):
        convs.append([{"role": "user", "content": JUDGE_PROMPT.format(prompt=p["prompt"], first=a, second=b)}])
        convs.append([{"role": "user", "content": JUDGE_PROMPT.format(prompt=p["prompt"], first=b, second=a)}])
    replies = judge(convs)
    out = []
    for i, (p, a, b) in enumerate(zip(prompts, answers_a, answers_b, strict=True)):
        r1, r2 = replies[2 * i], replies[2 * i + 1]
        v1, v2 = parse_verdict(r1), parse_verdict(r2)
        out.append({**p, "answer_a": a, "answer_b": b, "judge_a_first": r1, "judge_b_first": r2,
                    "verdict_a_first": v1, "verdict_b_first": v2, "outcome": combine(v1, v2),
                    "unparsed": (v1 is None) + (v2 is None)})
    return out


def rates(outcomes: list[str], *, samples: int = 1000, seed: int = 0) -> dict:
    """{"n", "win", "tie", "loss", "unparsed"?, and for each of win, tie, loss and net (win - loss) a 95%
    bootstrap interval "<name>_ci": [low, high]}."""
    n = len(outcomes)
    if n == 0:
        raise HerdError("no judged pairs")
    share = {k: outcomes.count(k) / n for k in ("win", "tie", "loss")}
    rng = random.Random(seed)
    draws: dict[str, list[float]] = {k: [] for k in ("win", "tie", "loss", "net")}
    for _ in range(samples):
        pick = [outcomes[rng.randrange(n)] for _ in range(n)]
        got = {k: pick.count(k) / n for k in ("win", "tie", "loss")}
        for k in ("win", "tie", "loss"):
            draws[k].append(got[k])
        draws["net"].append(got["win"] - got["loss"])
    out: dict = {"n": n, **share, "net": share["win"] - share["loss"]}
    for k, xs in draws.items():
        xs.sort()
        out[f"{k}_ci"] = [xs[int(0.025 * (samples - 1))], xs[int(0.975 * (samples - 1))]]
    return out


def aggregate(records: list[dict], *, samples: int = 1000, seed: int = 0) -> dict:
    """{"overall": rates, "categories": {category: rates}, "unparsed": judge replies naming no verdict}."""
    cats = {}
    for c in dict.fromkeys(r["category"] for r in records):
        cats[c] = rates([r["outcome"] for r in records if r["category"] == c], samples=samples, seed=seed)
    return {"overall": rates([r["outcome"] for r in records], samples=samples, seed=seed), "categories": cats,
            "unparsed": sum(r["unparsed"] for r in records)}


def plot(summary: dict, path: Path, a: str, b: str) -> None:
    """A stacked horizontal bar per category (and overall): A's wins, ties, losses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [("overall", summary["overall"])] + list(summary["categories"].items())
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.5))
    labels = [name for name, _ in rows][::-1]
    left = [0.0] * len(rows)
    for key, colour in (("win", "#3b7dd8"), ("tie", "#c8c8c8"), ("loss", "#e07b39")):
        values = [r[key] * 100 for _, r in rows][::-1]
        ax.barh(labels, values, left=left, color=colour, label=key)
        for i, v in enumerate(values):
            if v >= 6:
                ax.text(left[i] + v / 2, i, f"{v:.0f}%", ha="center", va="center", fontsize=8)
        left = [x + v for x, v in zip(left, values, strict=True)]
    ax.set_xlim(0, 100)
    ax.set_xlabel(f"% of prompts: A ({a}) against B ({b})")
    ax.legend(loc="lower right", ncol=3, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(out: Path, summary: dict, records: list[dict], a: str, b: str, judge: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"a": a, "b": b, "judge": judge, **summary}, indent=2) + "\n")
    with (out / "judgements.jsonl").open("w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    plot(summary, out / "pairwise.png", a, b)
    lines = [f"# Pairwise evaluation: A = `{a}`, B = `{b}`", "", f"Judge: `{judge}`, each pair judged in both "
             "orders (a disagreement is a tie). 95% bootstrap intervals.", "", "![win / tie / loss](pairwise.png)",
             "", "| category | n | A wins | ties | A loses | net (95% interval) |", "|---|---:|---:|---:|---:|---|"]
    for name, r in [("**overall**", summary["overall"]), *summary["categories"].items()]:
        lines.append(f"| {name} | {r['n']} | {r['win']:.1%} | {r['tie']:.1%} | {r['loss']:.1%} | "
                     f"{r['net']:+.1%} ({r['net_ci'][0]:+.1%} to {r['net_ci'][1]:+.1%}) |")
    lines += ["", f"Judge replies that named no verdict: {summary['unparsed']} of {2 * len(records)}."]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def pairwise(prompts_path: str, a: str, b: str, judge: str, out: str | Path, *, max_tokens: int = 256,
             limit: int | None = None, device: str | None = None) -> dict:
    """Both models answer, the judge judges, and the report is written into ``out``; the summary."""
    from llamaherd.eval.judge import make_judge

    prompts = load_prompts(prompts_path)[:limit] if limit else load_prompts(prompts_path)
    conversations = [[{"role": "user", "content": p["prompt"]}] for p in prompts]
    answers_a = make_judge(a, max_tokens=max_tokens, device=device)(conversations)
    answers_b = make_judge(b, max_tokens=max_tokens, device=device)(conversations)
    records = judge_pairs(make_judge(judge, max_tokens=8, device=device), prompts, answers_a, answers_b)
    summary = aggregate(records)
    write_report(Path(out), summary, records, a, b, judge)
    return summary
