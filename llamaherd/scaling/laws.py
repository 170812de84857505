"""Scaling laws: compute-optimal model size and data from a sweep of small training runs.

Two of the three methods of Hoffmann et al. (2022, "Training Compute-Optimal Large Language Models"),
and the law Meta fitted for Llama 3 (Llama 3 paper, section 3.2.1):

- **Approach 2, IsoFLOP profiles** (``fit_isoflop``). Runs are grouped by compute budget C. For each
  budget a parabola of the loss in log N is fitted over that budget's runs; its minimum is the
  compute-optimal size N*(C), and D*(C) is read off the same runs (D = C / FLOPs-per-token of a model
  of that size, interpolated in log N at N*). Power laws log N* = a log C + b and log D* = a' log C + b'
  through the minima give the exponents. Meta did the same, fitting D*(C) = A C^alpha.
- **Approach 3, a parametric loss** (``fit_parametric``). L(N, D) = E + A / N^alpha + B / D^beta,
  fitted to every run at once by minimising the Huber loss (delta 1e-3) of the residuals in log space,
      log L_pred = logsumexp(a - alpha log N, b - beta log D, e),   A = exp(a), B = exp(b), E = exp(e),
  with L-BFGS from a grid of starting points, as Hoffmann et al. did. Under C = 6 N D the
  compute-optimal allocation is N_opt = G (C/6)^(beta/(alpha+beta)), D_opt = G^-1 (C/6)^(alpha/(alpha+beta)),
  G = (alpha A / (beta B))^(1/(alpha+beta)).
- **Intervals**: bootstrap over runs (``bootstrap_isoflop``, ``bootstrap_parametric``): the fit repeated on
  resampled runs, percentile intervals of exponents, parameters and of the allocation at given budgets.

Published laws are ``CHINCHILLA`` (Hoffmann et al.'s approach 3 fit) and ``LLAMA3`` (Meta's D*(C));
``law_from_file`` reads a fit this module wrote (``herd scaling fit`` -> fit.json).

A run is a ``Run``: parameters N, training tokens D, training FLOPs C, the budget it was planned for
(runs of one IsoFLOP profile share it) and its loss in nats per token.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from llamaherd.errors import HerdError

HUBER_DELTA = 1e-3  # Hoffmann et al.'s delta
# Hoffmann et al.'s grid of starting points: alpha, beta in {0, 0.5, ..., 2}, e in {-1, -0.5, ..., 1},
# a, b in {0, 5, ..., 25}: 4,500 starts
_GRID_EXPONENT = np.arange(0.0, 2.01, 0.5)
_GRID_E = np.arange(-1.0, 1.01, 0.5)
_GRID_AB = np.arange(0.0, 25.01, 5.0)


class ScalingWarning(UserWarning):
    """A fit that ran but whose data do not support it well (e.g. an IsoFLOP minimum outside the sizes tried)."""


def _warn(message: str, into: list[str]) -> None:
    into.append(message)
    warnings.warn(message, ScalingWarning, stacklevel=3)


# --- runs ----------------------------------------------------------------------------------------------------

@dataclass
class Run:
    """One training run of a sweep: N parameters, D tokens, C = FLOPs spent, the planned budget, the loss."""

    params: float
    tokens: float
    flops: float
    loss: float
    budget: float = 0.0  # the IsoFLOP budget it belongs to (0: its own flops)
    name: str = ""
    mix: str = ""  # the data mix of a data-mix sweep ("" for one mix)

    def __post_init__(self) -> None:
        if not self.budget:
            self.budget = self.flops


def runs_from_records(records: list[dict], *, loss_key: str = "val_loss", where: str = "runs") -> list[Run]:
    """``Run``s from JSON records with ``params``, ``tokens``, the loss (``loss_key``, else ``loss``) and
    optionally ``flops`` (default 6 N D), ``budget``, ``name``, ``mix``. Every value must be positive."""
    runs = []
    for i, r in enumerate(records, 1):
        name = str(r.get("name", f"record {i}"))
        loss = r.get(loss_key, r.get("loss"))
        missing = [k for k, v in (("params", r.get("params")), ("tokens", r.get("tokens")), (loss_key, loss))
                   if v is None]
        if missing:
            raise HerdError(f"{where}: {name} has no {', '.join(missing)}; expected params, tokens and {loss_key} "
                            "(or loss) in every run")
        try:
            params, tokens, loss = float(r["params"]), float(r["tokens"]), float(loss)
            flops = float(r.get("flops") or 6 * params * tokens)
            budget = float(r.get("budget") or flops)
        except (TypeError, ValueError):
            raise HerdError(f"{where}: {name} has a value that is not a number") from None
        for key, value in (("params", params), ("tokens", tokens), ("flops", flops), ("budget", budget),
                           (loss_key, loss)):
            if not (value > 0 and math.isfinite(value)):
                raise HerdError(f"{where}: {name} has {key} {value:g}; expected a positive number")
        runs.append(Run(params, tokens, flops, loss, budget, name, str(r.get("mix", ""))))
    return runs


def check_budgets(budgets) -> list[float]:
    """Budgets as positive floats; a non-positive or non-finite one is an error."""
    out = []
    for b in budgets:
        try:
            value = float(b)
        except (TypeError, ValueError):
            raise HerdError(f"compute budget {b!r} is not a number; expected FLOPs such as 1e18") from None
        if not (value > 0 and math.isfinite(value)):
            raise HerdError(f"compute budget {value:g} FLOPs: budgets must be positive")
        out.append(value)
    if not out:
        raise HerdError("no compute budget given; expected one or more, e.g. 1e12,3e12,1e13")
    return out


def _need(n: int, n_params: int, what: str, unit: str) -> None:
    if n < n_params:
        raise HerdError(f"{what} fits {n_params} parameters but has {n} {unit}: add at least {n_params - n} more")


# --- laws ---------------------------------------------------------------------------------------------------

@dataclass
class PowerLaw:
    """y = coef * x^exponent."""

    coef: float
    exponent: float

    def __call__(self, x):
        return self.coef * np.power(x, self.exponent)

    @classmethod
    def fit(cls, x, y) -> PowerLaw:
        """Least squares of log y on log x."""
        slope, intercept = np.polyfit(np.log(x), np.log(y), 1)
        return cls(float(math.exp(intercept)), float(slope))


@dataclass
class ParametricLaw:
    """L(N, D) = E + A / N^alpha + B / D^beta (Hoffmann et al.'s approach 3), in nats per token."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, params, tokens):
        return self.E + self.A / np.power(params, self.alpha) + self.B / np.power(tokens, self.beta)

    @property
    def G(self) -> float:
        return (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))

    def optimal(self, flops, flops_per_param_token: float = 6.0) -> tuple[float, float]:
        """The (N, D) minimising L under C = k N D (k = 6 by default)."""
        c = np.asarray(flops, dtype=float) / flops_per_param_token
        s = self.alpha + self.beta
        n = self.G * np.power(c, self.beta / s)
        d = np.power(c, self.alpha / s) / self.G
        return (float(n), float(d)) if np.ndim(n) == 0 else (n, d)

    def exponents(self) -> tuple[float, float]:
        """(a, b) of N_opt ~ C^a and D_opt ~ C^b."""
        s = self.alpha + self.beta
        return self.beta / s, self.alpha / s


@dataclass
class TokenLaw:
    """Meta's form for Llama 3: D*(C) = A C^alpha optimal training tokens; N*(C) = C / (k D*)."""

    A: float
    alpha: float

    def optimal(self, flops, flops_per_param_token: float = 6.0) -> tuple[float, float]:
        d = self.A * np.power(np.asarray(flops, dtype=float), self.alpha)
        n = np.asarray(flops, dtype=float) / (flops_per_param_token * d)
        return (float(n), float(d)) if np.ndim(d) == 0 else (n, d)


# Hoffmann et al. 2022, approach 3 (section 3.3): E, A, B, alpha, beta as published
CHINCHILLA = ParametricLaw(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
# Llama 3 paper, section 3.2.1: (alpha, A) = (0.537, 0.299), for 3.8e25 FLOPs: a 402B model on 16.55T tokens
LLAMA3 = TokenLaw(A=0.299, alpha=0.537)
# what the paper derives from it for the flagship budget
LLAMA3_405B = {"flops": 3.8e25, "params": 402e9, "tokens": 16.55e12}


# --- approach 2: IsoFLOP profiles ----------------------------------------------------------------------------

@dataclass
class BudgetMinimum:
    """One IsoFLOP profile's parabola and its minimum."""

    budget: float
    runs: int
    params: float  # N*(C)
    tokens: float  # D*(C)
    loss: float  # the parabola's value at its minimum
    curvature: float  # the parabola's x^2 coefficient (x = ln N); must be positive
    sizes: tuple[float, float]  # the smallest and largest N tried
    bracketed: bool  # the minimum lies inside the sizes tried and the lowest loss is not at an end
    coefs: tuple[float, float, float] = (0.0, 0.0, 0.0)  # loss = c2 x^2 + c1 x + c0
    used: bool = True  # in the power laws (an unbracketed minimum is not, when 2 bracketed ones are there)


@dataclass
class IsoFLOPFit:
    minima: list[BudgetMinimum]
    params_law: PowerLaw  # N*(C)
    tokens_law: PowerLaw  # D*(C)
    loss_law: PowerLaw  # L*(C), a straight line in log-log through the minima's losses
    warnings: list[str] = field(default_factory=list)
    mix: str = ""

    def optimal(self, flops) -> tuple[float, float]:
        return float(self.params_law(flops)), float(self.tokens_law(flops))

    def to_dict(self) -> dict:
        return {"mix": self.mix, "params_law": asdict(self.params_law), "tokens_law": asdict(self.tokens_law),
                "loss_law": asdict(self.loss_law), "minima": [asdict(m) for m in self.minima],
                "warnings": self.warnings}


def isoflop_minimum(budget: float, runs: list[Run], warn_into: list[str] | None = None) -> BudgetMinimum | None:
    """The parabola of loss in ln N through one budget's runs and its minimum; None (with a warning) when
    the parabola opens downwards. A minimum outside the sizes tried, or a lowest loss at the smallest or
    largest size, is kept with a warning naming the budget and which sizes to add."""
    notes = warn_into if warn_into is not None else []
    _need(len(runs), 3, f"the parabola of budget {budget:.3g} FLOPs", "runs (one per model size)")
    x = np.log([r.params for r in runs])
    if len(set(np.round(x, 9))) < 3:
        raise HerdError(f"budget {budget:.3g} FLOPs: a parabola needs 3 different model sizes, got "
                        f"{len(set(np.round(x, 9)))}: add at least {3 - len(set(np.round(x, 9)))} more")
    y = np.array([r.loss for r in runs])
    c2, c1, c0 = np.polyfit(x, y, 2)
    lo, hi = float(np.exp(x.min())), float(np.exp(x.max()))
    if c2 <= 0:
        _warn(f"budget {budget:.3g} FLOPs: the loss has no minimum over the sizes tried (N {lo:.3g} to {hi:.3g}; "
              "the parabola opens downwards); this budget is left out: add smaller and larger sizes", notes)
        return None
    x_opt = -c1 / (2 * c2)
    n_opt = float(np.exp(x_opt))
    # D at N*: read off the runs' own tokens (log D is linear in log N along an IsoFLOP profile)
    slope, intercept = np.polyfit(x, np.log([r.tokens for r in runs]), 1)
    d_opt = float(np.exp(intercept + slope * x_opt))
    best = int(np.argmin(y))
    order = np.argsort(x)
    inside = x.min() <= x_opt <= x.max()
    at_end = best in (order[0], order[-1])
    if not inside or at_end:
        larger = x_opt > x.max() or (at_end and best == order[-1])
        side = "larger" if larger else "smaller"
        where = (f"the parabola's minimum N {n_opt:.3g} lies outside the sizes tried (N {lo:.3g} to {hi:.3g})"
                 if not inside else f"the lowest loss is at the {'largest' if larger else 'smallest'} size tried "
                 f"(N {float(np.exp(x[best])):.3g})")
        _warn(f"budget {budget:.3g} FLOPs: {where}; the minimum is not bracketed: add {side} sizes", notes)
    return BudgetMinimum(budget=budget, runs=len(runs), params=n_opt, tokens=d_opt,
                         loss=float(c0 + c1 * x_opt + c2 * x_opt**2), curvature=float(c2), sizes=(lo, hi),
                         bracketed=bool(inside and not at_end), coefs=(float(c2), float(c1), float(c0)))


def group_by_budget(runs: list[Run]) -> dict[float, list[Run]]:
    groups: dict[float, list[Run]] = {}
    for r in runs:
        groups.setdefault(r.budget, []).append(r)
    return dict(sorted(groups.items()))


def fit_isoflop(runs: list[Run], *, quiet: bool = False) -> IsoFLOPFit:
    """Approach 2 over ``runs`` of one data mix: a parabola per budget, then power laws through the minima.
    Needs 3 sizes per budget and 2 budgets whose profiles have a minimum."""
    if len({r.mix for r in runs}) > 1:
        raise HerdError("runs of several data mixes: fit each mix on its own (fit_by_mix)")
    notes: list[str] = []
    groups = group_by_budget(runs)
    _need(len(groups), 2, "approach 2 (a power law N*(C) = A C^a through the IsoFLOP minima)", "budgets")
    minima = []
    with warnings.catch_warnings():
        if quiet:
            warnings.simplefilter("ignore", ScalingWarning)
        for budget, rs in groups.items():
            sizes = len({round(math.log(r.params), 9) for r in rs})
            if sizes < 3:  # too few for its own parabola: left out, the others may still make the fit
                _warn(f"budget {budget:.3g} FLOPs has {sizes} model size(s); a parabola needs 3: add at least "
                      f"{3 - sizes} more size(s) at this budget; it is left out", notes)
                continue
            m = isoflop_minimum(budget, rs, notes)
            if m is not None:
                minima.append(m)
    if len(minima) < 2:
        raise HerdError(f"approach 2 needs 2 budgets with 3 model sizes or more whose loss has a minimum, got "
                        f"{len(minima)}: add at least {2 - len(minima)} more such budget(s)")
    # an unbracketed minimum is an extrapolation of its parabola: the power laws go through the bracketed ones
    # when there are 2 or more of them, else through all, as warned
    if sum(m.bracketed for m in minima) >= 2:
        for m in minima:
            m.used = m.bracketed
        left_out = [f"{m.budget:.3g}" for m in minima if not m.used]
        if left_out:
            _warn(f"approach 2's power laws leave out the unbracketed minima of budget(s) {', '.join(left_out)} FLOPs",
                  notes)
    used = [m for m in minima if m.used]
    c = np.array([m.budget for m in used])
    return IsoFLOPFit(minima=minima, params_law=PowerLaw.fit(c, [m.params for m in used]),
                      tokens_law=PowerLaw.fit(c, [m.tokens for m in used]),
                      loss_law=PowerLaw.fit(c, [m.loss for m in used]), warnings=notes,
                      mix=runs[0].mix if runs else "")


# --- approach 3: the parametric loss --------------------------------------------------------------------------

def _huber(r: np.ndarray, delta: float) -> np.ndarray:
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def _objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray, delta: float):
    """Sum of Huber losses of the log-space residuals, divided by delta (the same minimiser, better scaled
    for L-BFGS's tolerances), and its gradient in (a, b, e, alpha, beta)."""
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
    top = terms.max(axis=0)
    w = np.exp(terms - top)
    total = w.sum(axis=0)
    pred = top + np.log(total)
    w /= total
    r = pred - log_l
    value = _huber(r, delta).sum() / delta
    g = np.clip(r, -delta, delta) / delta
    grad = np.array([(g * w[0]).sum(), (g * w[1]).sum(), (g * w[2]).sum(),
                     -(g * w[0] * log_n).sum(), -(g * w[1] * log_d).sum()])
    return value, grad


def _grid_values(log_n, log_d, log_l, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Every start of Hoffmann et al.'s grid, and the objective there (all evaluated at once)."""
    grid = np.stack(np.meshgrid(_GRID_AB, _GRID_AB, _GRID_E, _GRID_EXPONENT, _GRID_EXPONENT, indexing="ij"),
                    axis=-1).reshape(-1, 5)
    a, b, e, alpha, beta = (grid[:, i : i + 1] for i in range(5))
    t1, t2 = a - alpha * log_n, b - beta * log_d
    t3 = np.broadcast_to(e, t1.shape)
    top = np.maximum(np.maximum(t1, t2), t3)
    pred = top + np.log(np.exp(t1 - top) + np.exp(t2 - top) + np.exp(t3 - top))
    return grid, _huber(pred - log_l, delta).sum(axis=1) / delta


@dataclass
class ParametricFit:
    law: ParametricLaw
    objective: float  # the Huber objective at the optimum (divided by delta)
    runs: int
    starts: int  # L-BFGS runs made
    rms_log_error: float  # root mean square of the log-space residuals
    warnings: list[str] = field(default_factory=list)
    mix: str = ""

    def to_dict(self) -> dict:
        return {"mix": self.mix, "law": asdict(self.law), "objective": self.objective, "runs": self.runs,
                "starts": self.starts, "rms_log_error": self.rms_log_error, "warnings": self.warnings}


def fit_parametric(runs: list[Run], *, delta: float = HUBER_DELTA, starts: int = 64,
                   init: list[np.ndarray] | None = None) -> ParametricFit:
    """Approach 3: (E, A, B, alpha, beta) minimising the Huber loss of log-space residuals over ``runs``.

    Every point of Hoffmann et al.'s grid (4,500) is evaluated; L-BFGS starts from the ``starts`` best of
    them (0: from all of them, as Hoffmann et al.), and from ``init`` (e.g. a previous solution); the best
    optimum wins. Needs at least as many runs as parameters (5).
    """
    minimize = scipy_optimize().minimize
    _need(len(runs), 5, "approach 3 (L = E + A/N^alpha + B/D^beta)", "runs")
    if delta <= 0:
        raise HerdError(f"Huber delta {delta:g}: expected a positive number")
    log_n = np.log([r.params for r in runs])
    log_d = np.log([r.tokens for r in runs])
    log_l = np.log([r.loss for r in runs])
    grid, values = _grid_values(log_n, log_d, log_l, delta)
    order = np.argsort(values, kind="stable")
    chosen = [grid[i] for i in (order if starts <= 0 else order[:starts])] + list(init or [])
    best = None
    with _one_blas_thread():
        for theta0 in chosen:
            res = minimize(_objective, np.asarray(theta0, dtype=float), args=(log_n, log_d, log_l, delta), jac=True,
                           method="L-BFGS-B", options={"maxiter": 1000, "gtol": 1e-9, "ftol": 1e-14})
            if np.all(np.isfinite(res.x)) and (best is None or res.fun < best.fun):
                best = res
    a, b, e, alpha, beta = (float(v) for v in best.x)
    law = ParametricLaw(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=alpha, beta=beta)
    resid = np.log(law.loss(np.exp(log_n), np.exp(log_d))) - log_l
    notes: list[str] = []
    if alpha <= 0 or beta <= 0:
        _warn(f"approach 3: a non-positive exponent (alpha {alpha:.3g}, beta {beta:.3g}): the loss does not fall "
              "with size or data over these runs; the compute-optimal allocation is meaningless", notes)
    return ParametricFit(law=law, objective=float(best.fun), runs=len(runs), starts=len(chosen),
                         rms_log_error=float(np.sqrt(np.mean(resid**2))), warnings=notes,
                         mix=runs[0].mix if runs else "")


def scipy_optimize():
    """scipy.optimize, or a one-line error saying how to get it (the fits need it; nothing else does)."""
    try:
        import scipy.optimize
    except ImportError:
        raise HerdError("the scaling-law fits need SciPy: pip install llamaherd[scaling] (or scipy)") from None
    return scipy.optimize


def _one_blas_thread():
    """L-BFGS-B's small vector operations on one BLAS thread: with more, OpenBLAS's thread hand-offs make each
    iteration about 100 times slower on a busy machine (a second per start instead of 10 ms)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        from contextlib import nullcontext

        return nullcontext()
    return threadpool_limits(1, user_api="blas")


def theta_of(law: ParametricLaw) -> np.ndarray:
    return np.array([math.log(law.A), math.log(law.B), math.log(law.E), law.alpha, law.beta])


# --- bootstrap intervals --------------------------------------------------------------------------------------

def _interval(samples, level: float) -> list[float]:
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(np.asarray(samples, dtype=float), [tail, 100 - tail])
    return [float(lo), float(hi)]


FRONTIER_POINTS = 24  # budgets at which a bootstrap gives the frontier's interval (for optimal.png)


def frontier_grid(budgets, at_flops=()) -> np.ndarray:
    """Budgets from the smallest run's to the largest of the runs' and the asked ones, geometrically spaced."""
    values = [*budgets, *at_flops]
    return np.geomspace(min(values), max(values), FRONTIER_POINTS)


def _frontier(grid: np.ndarray, params: list, tokens: list, level: float) -> dict | None:
    """The pointwise percentile band of N*(C) and D*(C) over ``grid`` from the resamples' curves."""
    if not params:
        return None
    tail = (1 - level) / 2 * 100
    band = {key: np.percentile(np.asarray(curves), [tail, 100 - tail], axis=0).tolist()
            for key, curves in (("params", params), ("tokens", tokens))}
    return {"flops": grid.tolist(), **band}


def bootstrap_isoflop(runs: list[Run], *, n: int = 200, at_flops=(), level: float = 0.95, seed: int = 0) -> dict:
    """Percentile intervals of approach 2's exponents (and of N*, D* at ``at_flops``), from ``n`` refits on
    runs resampled with replacement within each budget. Resamples whose fit fails are skipped and counted."""
    rng = np.random.default_rng(seed)
    groups = group_by_budget(runs)
    keys = ["params_exponent", "tokens_exponent"] + [f"{k}@{c:.3g}" for c in at_flops for k in ("params", "tokens")]
    samples: dict[str, list[float]] = {k: [] for k in keys}
    grid, curves_n, curves_d = frontier_grid(list(groups), at_flops), [], []
    failed = 0
    for _ in range(n):
        resampled = [rs[i] for rs in groups.values() for i in rng.integers(0, len(rs), len(rs))]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fit = fit_isoflop(resampled, quiet=True)
        except (HerdError, np.linalg.LinAlgError, ValueError):
            failed += 1
            continue
        samples["params_exponent"].append(fit.params_law.exponent)
        samples["tokens_exponent"].append(fit.tokens_law.exponent)
        curves_n.append(fit.params_law(grid))
        curves_d.append(fit.tokens_law(grid))
        for c in at_flops:
            nn, dd = fit.optimal(c)
            samples[f"params@{c:.3g}"].append(nn)
            samples[f"tokens@{c:.3g}"].append(dd)
    out = {k: _interval(v, level) for k, v in samples.items() if v}
    return {"level": level, "resamples": n, "failed": failed, "intervals": out,
            "frontier": _frontier(grid, curves_n, curves_d, level)}


def bootstrap_parametric(runs: list[Run], *, n: int = 100, at_flops=(), level: float = 0.95, seed: int = 0,
                         fit: ParametricFit | None = None, starts: int = 8) -> dict:
    """Percentile intervals of approach 3's parameters (and of N_opt, D_opt at ``at_flops``) from ``n`` refits
    on runs resampled with replacement; each refit starts from the full fit and the ``starts`` best grid points."""
    rng = np.random.default_rng(seed)
    fit = fit or fit_parametric(runs)
    init = [theta_of(fit.law)]
    keys = ["E", "A", "B", "alpha", "beta"] + [f"{k}@{c:.3g}" for c in at_flops for k in ("params", "tokens")]
    samples: dict[str, list[float]] = {k: [] for k in keys}
    grid, curves_n, curves_d = frontier_grid([r.budget for r in runs], at_flops), [], []
    failed = 0
    for _ in range(n):
        resampled = [runs[i] for i in rng.integers(0, len(runs), len(runs))]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                law = fit_parametric(resampled, starts=starts, init=init).law
        except (HerdError, ValueError, FloatingPointError):
            failed += 1
            continue
        for k in ("E", "A", "B", "alpha", "beta"):
            samples[k].append(getattr(law, k))
        nn, dd = law.optimal(grid)
        curves_n.append(nn)
        curves_d.append(dd)
        for c in at_flops:
            nn, dd = law.optimal(c)
            samples[f"params@{c:.3g}"].append(nn)
            samples[f"tokens@{c:.3g}"].append(dd)
    out = {k: _interval(v, level) for k, v in samples.items() if v}
    return {"level": level, "resamples": n, "failed": failed, "intervals": out,
            "frontier": _frontier(grid, curves_n, curves_d, level)}


# --- several data mixes, held-out runs --------------------------------------------------------------------

def by_mix(runs: list[Run]) -> dict[str, list[Run]]:
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(r.mix, []).append(r)
    return groups


def holdout_largest(runs: list[Run], *, starts: int = 64) -> dict:
    """Fit without the largest budget's runs, then predict them: approach 3's L(N, D) for each held-out run,
    and approach 2's L*(C) for the best of them (when the remaining runs allow approach 2). The errors are
    relative: (predicted - measured) / measured."""
    top = max(r.budget for r in runs)
    held = [r for r in runs if r.budget == top]
    rest = [r for r in runs if r.budget != top]
    if not rest:
        raise HerdError("every run has the same budget: nothing is left to fit once the largest is held out")
    out: dict = {"budget": top, "held_out": [], "fit_runs": len(rest)}
    law = fit_parametric(rest, starts=starts).law
    out["approach3"] = asdict(law)
    for r in sorted(held, key=lambda r: r.params):
        pred = float(law.loss(r.params, r.tokens))
        out["held_out"].append({"name": r.name, "params": r.params, "tokens": r.tokens, "loss": r.loss,
                                "predicted": pred, "error": (pred - r.loss) / r.loss})
    best = min(held, key=lambda r: r.loss)
    out["best"] = best.name
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ScalingWarning)
            iso = fit_isoflop(rest, quiet=True)
        pred = float(iso.loss_law(top))
        out["approach2"] = {"predicted_min_loss": pred, "measured_min_loss": best.loss,
                            "error": (pred - best.loss) / best.loss, "params_opt": float(iso.params_law(top))}
    except HerdError as e:
        out["approach2"] = {"skipped": str(e)}
    return out


# --- fitted laws on disk ---------------------------------------------------------------------------------------

def law_from_file(path: str | Path, *, approach: int = 3, mix: str | None = None):
    """The law of a fit.json that ``herd scaling fit`` wrote: approach 3's ``ParametricLaw`` (default) or
    approach 2's (N*(C), D*(C)) pair as an ``IsoFLOPLaw``; ``mix`` chooses among a data-mix sweep's fits."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise HerdError(f"{path}: not a readable fit file ({e}); expected the fit.json of herd scaling fit") from None
    fits = data.get("fits") if isinstance(data, dict) else None
    if not isinstance(fits, list) or not fits:
        raise HerdError(f"{path}: no \"fits\" list; expected the fit.json of herd scaling fit")
    mixes = [f.get("mix", "") for f in fits]
    if mix is None:
        if len(fits) > 1:
            raise HerdError(f"{path}: fits for several data mixes ({', '.join(mixes)}); choose one with --mix")
        chosen = fits[0]
    elif mix in mixes:
        chosen = fits[mixes.index(mix)]
    else:
        raise HerdError(f"{path}: no fit for mix {mix!r}; it has {', '.join(repr(m) for m in mixes)}")
    key = {2: "approach2", 3: "approach3"}.get(approach)
    if key is None:
        raise HerdError(f"approach {approach}: expected 2 or 3")
    part = chosen.get(key)
    if not part or "skipped" in part:
        raise HerdError(f"{path}: approach {approach} was not fitted ({(part or {}).get('skipped', 'absent')})")
    if approach == 3:
        return ParametricLaw(**part["law"])
    return IsoFLOPLaw(PowerLaw(**part["params_law"]), PowerLaw(**part["tokens_law"]))


@dataclass
class IsoFLOPLaw:
    """Approach 2's two power laws, N*(C) and D*(C), fitted independently."""

    params_law: PowerLaw
    tokens_law: PowerLaw

    def optimal(self, flops, flops_per_param_token: float = 6.0) -> tuple[float, float]:
        return float(self.params_law(flops)), float(self.tokens_law(flops))


def optimal(law, flops: float, flops_per_param_token: float = 6.0) -> dict:
    """The compute-optimal allocation at ``flops`` under ``law``: parameters, tokens, tokens per parameter,
    the loss when the law predicts one, and 6 N D against the budget (approach 2's two laws are fitted
    independently, so their product need not equal C)."""
    (flops,) = check_budgets([flops])
    n, d = law.optimal(flops, flops_per_param_token)
    out = {"flops": flops, "params": n, "tokens": d, "tokens_per_param": d / n,
           "flops_6nd": 6 * n * d, "params_6nd": flops / (6 * d)}
    if isinstance(law, ParametricLaw):
        out["loss"] = float(law.loss(n, d))
    return out


# --- everything a sweep's fit reports ---------------------------------------------------------------------

def fit_sweep(runs: list[Run], *, approach: str = "both", bootstrap: int = 0, at_flops=(), holdout: bool = False,
              starts: int = 64, seed: int = 0) -> dict:
    """Fit each data mix of ``runs`` by approach 2, 3 or both; optionally bootstrap intervals, the allocation
    at ``at_flops`` and the held-out check of ``holdout_largest``. Returns what fit.json holds:
    {"fits": [per mix: approach2, approach3, intervals, optimal, holdout, warnings], "ranking": ...}.
    An approach that was asked for alone and cannot be fitted is an error; with "both", only when neither can."""
    if approach not in ("2", "3", "both"):
        raise HerdError(f"approach {approach!r}: expected 2, 3 or both")
    if not runs:
        raise HerdError("no runs to fit")
    at_flops = check_budgets(at_flops) if at_flops else []
    fits = []
    for mix, rs in by_mix(runs).items():
        entry: dict = {"mix": mix, "runs": len(rs), "budgets": sorted({r.budget for r in rs}), "warnings": [],
                       "optimal": [{"flops": c} for c in at_flops]}
        errors = []
        if approach in ("2", "both"):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ScalingWarning)
                    iso = fit_isoflop(rs)
                entry["approach2"] = iso.to_dict()
                entry["warnings"] += iso.warnings
                for row in entry["optimal"]:
                    n, d = iso.optimal(row["flops"])
                    row["approach2"] = {"params": n, "tokens": d, "loss": float(iso.loss_law(row["flops"]))}
                if bootstrap:
                    entry["approach2"]["bootstrap"] = bootstrap_isoflop(rs, n=bootstrap, at_flops=at_flops, seed=seed)
            except HerdError as e:
                entry["approach2"] = {"skipped": str(e)}
                errors.append(f"approach 2: {e}")
        if approach in ("3", "both"):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ScalingWarning)
                    par = fit_parametric(rs, starts=starts)
                entry["approach3"] = par.to_dict()
                entry["warnings"] += par.warnings
                for row in entry["optimal"]:
                    n, d = par.law.optimal(row["flops"])
                    row["approach3"] = {"params": n, "tokens": d, "loss": float(par.law.loss(n, d))}
                if bootstrap:
                    entry["approach3"]["bootstrap"] = bootstrap_parametric(
                        rs, n=max(bootstrap // 2, 1), at_flops=at_flops, seed=seed, fit=par)
            except HerdError as e:
                entry["approach3"] = {"skipped": str(e)}
                errors.append(f"approach 3: {e}")
        if len(errors) == (2 if approach == "both" else 1):
            raise HerdError(("mix " + repr(mix) + ": " if mix else "") + "; ".join(errors))
        if holdout:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ScalingWarning)
                    entry["holdout"] = holdout_largest(rs, starts=starts)
            except HerdError as e:
                entry["holdout"] = {"skipped": str(e)}
        entry.update(_summary(entry))
        fits.append(entry)
    out: dict = {"fits": fits}
    if len(fits) > 1 and at_flops:  # a data-mix sweep: which mix a model at each budget should train on
        ranking = []
        for i, c in enumerate(at_flops):
            scores = []
            for f in fits:
                row = f["optimal"][i]
                loss = row.get("approach3", row.get("approach2", {})).get("loss")
                if loss is not None:
                    scores.append({"mix": f["mix"], "loss": loss})
            ranking.append({"flops": c, "mixes": sorted(scores, key=lambda s: s["loss"])})
        out["ranking"] = ranking
    # the headline at the top: the one fit, or in a data-mix sweep the mix ranked best at the largest budget
    best = fits[0]
    if out.get("ranking") and out["ranking"][-1]["mixes"]:
        best = next(f for f in fits if f["mix"] == out["ranking"][-1]["mixes"][0]["mix"])
    return {"mix": best["mix"], "parametric": best["parametric"], "isoflop": best["isoflop"], **out}


def _summary(entry: dict) -> dict:
    """A fit's headline: approach 3's ``{"E", "A", "B", "alpha", "beta"}`` as ``parametric`` and approach 2's
    exponents and coefficients of N*(C) and D*(C) as ``isoflop`` (None for an approach not fitted)."""
    a2, a3 = entry.get("approach2", {}), entry.get("approach3", {})
    iso = None
    if "params_law" in a2:
        iso = {"params_exponent": a2["params_law"]["exponent"], "tokens_exponent": a2["tokens_law"]["exponent"],
               "params_coef": a2["params_law"]["coef"], "tokens_coef": a2["tokens_law"]["coef"]}
    law = a3.get("law")
    par = {k: law[k] for k in ("E", "A", "B", "alpha", "beta")} if law else None
    return {"parametric": par, "isoflop": iso}
