"""Predicting a benchmark's accuracy at a larger compute budget, in two steps (Llama 3 paper, section 3.2.1).

    1. the compute-optimal models' normalised negative log-likelihood of the correct answer against
       training FLOPs: a power law, nll(C) = coef * C^exponent (a straight line in log-log);
    2. accuracy against that NLL: a sigmoid,
           accuracy(nll) = floor + (ceiling - floor) / (1 + exp(k (nll - mid))),
       fitted on every model with both numbers, including older or larger models that are not part of the
       sweep (they need no FLOPs).

The prediction at C is accuracy(nll(C)), with bootstrap intervals (both fits repeated on resampled models).

Input: a JSONL file of models, one object a line (``read_points``):

    {"name": "c1e12-d64", "flops": 1.2e12, "nll": 0.91, "accuracy": 0.41}

``flops`` is needed for step 1, ``accuracy`` for step 2, ``nll`` for both: the mean over a multiple-choice
task's items of -log P(correct answer | question) divided by the answer's length in characters.
``points_from_eval`` makes such a line from a `herd eval ... --log-samples --json` result (its per-item
``loglikelihoods``, ``gold`` and ``choices``); ``task_points`` does it for a sweep's runs, the FLOPs taken
from the sweep's runs.jsonl.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from llamaherd.errors import HerdError
from llamaherd.scaling.laws import PowerLaw, check_budgets


@dataclass
class TaskPoint:
    name: str
    nll: float
    flops: float | None = None
    accuracy: float | None = None


def read_points(path: str | Path) -> list[TaskPoint]:
    """The models of a task-points JSONL file (see the module's docstring); bad lines are one-line errors."""
    from llamaherd.data.records import read_records

    points = []
    for where, r in read_records(path):
        if "nll" not in r:
            raise HerdError(f"{where}: expected an object with \"nll\" (and \"flops\" and/or \"accuracy\")")
        points.append(_point(r, where))
    if not points:
        raise HerdError(f"{path}: no models; expected one JSON object a line")
    return points


def _point(r: dict, where: str) -> TaskPoint:
    def num(key, lo, hi=math.inf):
        value = r.get(key)
        if value is None:
            return None
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise HerdError(f"{where}: {key} {value!r} is not a number") from None
        if not (lo < value <= hi) or not math.isfinite(value):
            raise HerdError(f"{where}: {key} {value:g} is out of range; expected {lo} < {key} <= {hi}")
        return value

    return TaskPoint(name=str(r.get("name", where)), nll=num("nll", 0), flops=num("flops", 0),
                     accuracy=num("accuracy", -1e-12, 1.0))


# --- step 1 and step 2 ------------------------------------------------------------------------------------

@dataclass
class Sigmoid:
    """accuracy(nll) = floor + (ceiling - floor) / (1 + exp(k (nll - mid))): falls from ceiling to floor."""

    floor: float
    ceiling: float
    k: float
    mid: float

    def __call__(self, nll):
        z = np.clip(self.k * (np.asarray(nll, dtype=float) - self.mid), -500, 500)
        return self.floor + (self.ceiling - self.floor) / (1 + np.exp(z))


def fit_nll_law(points: list[TaskPoint]) -> PowerLaw:
    """Step 1: nll = coef * C^exponent over the models with FLOPs (needs 2)."""
    pts = [p for p in points if p.flops is not None]
    if len(pts) < 2:
        raise HerdError(f"step 1 (NLL against FLOPs) fits 2 parameters but has {len(pts)} model(s) with flops: "
                        f"add at least {2 - len(pts)} more")
    if len({p.flops for p in pts}) < 2:
        raise HerdError("step 1 (NLL against FLOPs): every model has the same flops; add models of other budgets")
    return PowerLaw.fit([p.flops for p in pts], [p.nll for p in pts])


def fit_sigmoid(points: list[TaskPoint], *, floor: float | None = None, ceiling: float = 1.0) -> Sigmoid:
    """Step 2: the sigmoid of accuracy in NLL over the models with an accuracy. ``floor`` fixed (e.g. chance,
    1/choices) or, when None, fitted; ``ceiling`` fixed (1.0). Needs as many models as fitted parameters."""
    from llamaherd.scaling.laws import scipy_optimize

    curve_fit = scipy_optimize().curve_fit
    pts = [p for p in points if p.accuracy is not None]
    n_params = 2 if floor is not None else 3
    if len(pts) < n_params:
        raise HerdError(f"step 2 (accuracy against NLL) fits {n_params} parameters but has {len(pts)} model(s) "
                        f"with an accuracy: add at least {n_params - len(pts)} more"
                        + ("" if floor is not None else ", or fix the floor (--chance)"))
    x = np.array([p.nll for p in pts])
    y = np.array([p.accuracy for p in pts])
    spread = max(float(x.max() - x.min()), 1e-3)
    k0, mid0 = 4.0 / spread, float(np.median(x))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if floor is not None:
                (k, mid), _ = curve_fit(lambda v, k, m: Sigmoid(floor, ceiling, k, m)(v), x, y, p0=[k0, mid0],
                                        bounds=([1e-6, -np.inf], [np.inf, np.inf]), maxfev=20000)
                return Sigmoid(float(floor), ceiling, float(k), float(mid))
            (lo, k, mid), _ = curve_fit(lambda v, f, k, m: Sigmoid(f, ceiling, k, m)(v), x, y,
                                        p0=[max(0.0, float(y.min()) - 0.01), k0, mid0],
                                        bounds=([0.0, 1e-6, -np.inf], [ceiling, np.inf, np.inf]), maxfev=20000)
        except RuntimeError as e:
            raise HerdError(f"step 2: the sigmoid did not converge on these {len(pts)} models ({e})") from None
    return Sigmoid(float(lo), ceiling, float(k), float(mid))


def predict_task(points: list[TaskPoint], flops, *, floor: float | None = None, ceiling: float = 1.0,
                 bootstrap: int = 200, level: float = 0.95, seed: int = 0) -> dict:
    """Both steps, and the predicted NLL and accuracy at each of ``flops`` with bootstrap intervals."""
    targets = check_budgets(flops if isinstance(flops, (list, tuple)) else [flops])
    if not 0 <= (floor if floor is not None else 0) < ceiling <= 1:
        raise HerdError(f"floor {floor} and ceiling {ceiling}: expected 0 <= floor < ceiling <= 1")
    law = fit_nll_law(points)
    sig = fit_sigmoid(points, floor=floor, ceiling=ceiling)
    rng = np.random.default_rng(seed)
    step1 = [p for p in points if p.flops is not None]
    step2 = [p for p in points if p.accuracy is not None]
    draws: list[tuple[PowerLaw, Sigmoid]] = []
    failed = 0
    for _ in range(bootstrap):
        s1 = [step1[i] for i in rng.integers(0, len(step1), len(step1))]
        s2 = [step2[i] for i in rng.integers(0, len(step2), len(step2))]
        try:
            draws.append((fit_nll_law(s1), fit_sigmoid(s2, floor=floor, ceiling=ceiling)))
        except (HerdError, ValueError, np.linalg.LinAlgError):
            failed += 1
    tail = (1 - level) / 2 * 100
    predictions = []
    for c in targets:
        nll = float(law(c))
        row = {"flops": c, "nll": nll, "accuracy": float(sig(nll))}
        if draws:
            nlls = [float(a(c)) for a, _ in draws]
            accs = [float(b(a(c))) for a, b in draws]
            row["nll_interval"] = [float(v) for v in np.percentile(nlls, [tail, 100 - tail])]
            row["accuracy_interval"] = [float(v) for v in np.percentile(accs, [tail, 100 - tail])]
        predictions.append(row)
    extrapolated = max(targets) > max(p.flops for p in step1) * 1.0001
    return {"nll_law": asdict(law), "sigmoid": asdict(sig), "models_step1": len(step1), "models_step2": len(step2),
            "bootstrap": {"resamples": bootstrap, "failed": failed, "level": level}, "predictions": predictions,
            "extrapolated": extrapolated}


# --- from herd eval's results ------------------------------------------------------------------------------

def normalized_nll(samples: list[dict], where: str = "samples") -> float:
    """Mean over items of -log P(correct answer) / characters of the answer, from `herd eval --log-samples`
    records of a multiple-choice task (``loglikelihoods``, ``gold``, ``choices``)."""
    values = []
    for i, s in enumerate(samples):
        try:
            ll, gold, choice = s["loglikelihoods"][s["gold"]], s["gold"], s["choices"][s["gold"]]
        except (KeyError, IndexError, TypeError):
            raise HerdError(f"{where}: item {i} lacks loglikelihoods / gold / choices; expected a multiple-choice "
                            "task's records from herd eval --log-samples") from None
        del gold
        values.append(-float(ll) / max(len(choice), 1))
    if not values:
        raise HerdError(f"{where}: no items")
    return float(np.mean(values))


def points_from_eval(path: str | Path, task: str, *, flops: float | None = None, name: str | None = None,
                     metric: str = "acc") -> TaskPoint:
    """One model's line for predict-task from its `herd eval MODEL --tasks TASK --log-samples --json PATH`."""
    path = Path(path)
    try:
        result = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise HerdError(f"{path}: not a readable herd eval result ({e})") from None
    tasks = result.get("tasks", {}) if isinstance(result, dict) else {}
    if task not in tasks:
        raise HerdError(f"{path}: no task {task!r}; it has {', '.join(tasks) or 'none'}")
    t = tasks[task]
    if "samples" not in t:
        raise HerdError(f"{path}: task {task} has no per-item records; run herd eval with --log-samples")
    if metric not in t:
        raise HerdError(f"{path}: task {task} has no {metric!r}; expected a multiple-choice task (acc, acc_norm)")
    return TaskPoint(name=name or str(result.get("model", path.stem)),
                     nll=normalized_nll(t["samples"], f"{path}: {task}"), flops=flops, accuracy=float(t[metric]))


def task_points(eval_files: list[str | Path], task: str, *, sweep_dir: str | Path | None = None,
                metric: str = "acc", optimal_only: bool = False) -> list[TaskPoint]:
    """Lines for predict-task from several eval results. Each result's model (a sweep run's directory, or a
    checkpoint inside one) is found in the sweep's runs.jsonl for its FLOPs; a model that is not part of the
    sweep keeps no FLOPs (it still counts in step 2). ``optimal_only``: step 1 keeps only the best run of
    each budget (the compute-optimal models, as Meta did)."""
    from llamaherd.scaling.sweep import read_records

    records = read_records(sweep_dir) if sweep_dir else []
    base = Path(sweep_dir) if sweep_dir and Path(sweep_dir).is_dir() else Path(sweep_dir or ".").parent
    by_dir = {(base / r.get("run_dir", f"runs/{r.get('name')}")).resolve(): r for r in records}
    best: dict = {}  # budget -> its run of lowest validation loss
    for r in records:
        if r.get("val_loss") is not None and (r.get("budget") not in best
                                               or r["val_loss"] < best[r.get("budget")]["val_loss"]):
            best[r.get("budget")] = r
    out = []
    for f in eval_files:
        point = points_from_eval(f, task, metric=metric)  # checks the file first
        result = json.loads(Path(f).read_text())
        model = Path(str(result.get("model", ""))).resolve() if result.get("model") else None
        rec = None
        if model is not None:
            for d, r in by_dir.items():
                if model == d or d in model.parents:
                    rec = r
        flops = rec.get("flops") if rec else None
        if rec and optimal_only and best.get(rec.get("budget"), {}).get("name") != rec["name"]:
            flops = None
        point.flops, point.name = flops, rec["name"] if rec else point.name
        out.append(point)
    return out


def write_points(points: list[TaskPoint], path: str | Path) -> None:
    Path(path).write_text("".join(json.dumps({k: v for k, v in asdict(p).items() if v is not None}) + "\n"
                                  for p in points), encoding="utf-8")
