"""A sweep's fit on paper: IsoFLOP curves, the compute-optimal frontier, report.md.

    isoflops.png   loss against N for each budget: the runs, approach 2's parabolas and their minima,
                   approach 3's L(N, C / (k N)) dashed (one file per data mix: isoflops-MIX.png)
    optimal.png    N*(C) and D*(C): the IsoFLOP minima, approach 2's power laws, approach 3's allocation,
                   each with its bootstrap interval as a band when the fit was bootstrapped
    tokens.png     loss against tokens at fixed N past the compute-optimal D (approach 3)
    report.md      the runs, both fits with their intervals, the allocation at the asked budgets, the
                   held-out check, every warning, and the data mixes ranked
    task.png       (predict-task) NLL against FLOPs and accuracy against NLL, with the prediction
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from llamaherd.scaling.laws import ParametricLaw, PowerLaw, Run, by_mix, group_by_budget


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _save(plt, fig, axes, path: Path) -> Path:
    """Grid and legend on each of ``axes``, then the figure written to ``path`` and closed."""
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _suffix(mix: str) -> str:
    return f"-{mix}" if mix else ""


def plot_isoflops(runs: list[Run], fit: dict, path: Path, flops_per_param_token: float = 6.0) -> Path | None:
    """One mix's runs, loss against N, a colour per budget, with both approaches' curves."""
    plt = _plt()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=110)
    groups = group_by_budget(runs)
    colors = plt.cm.viridis(np.linspace(0, 0.9, max(len(groups), 1)))
    minima = {m["budget"]: m for m in fit.get("approach2", {}).get("minima", [])}
    law = ParametricLaw(**fit["approach3"]["law"]) if "law" in fit.get("approach3", {}) else None
    for color, (budget, rs) in zip(colors, groups.items(), strict=False):
        n = np.array([r.params for r in rs])
        ax.scatter(n, [r.loss for r in rs], color=color, s=22, zorder=3, label=f"C = {budget:.2g}")
        xs = np.geomspace(n.min() / 1.5, n.max() * 1.5, 100)
        m = minima.get(budget)
        if m:
            c2, c1, c0 = m["coefs"]
            lx = np.log(xs)
            ax.plot(xs, c2 * lx**2 + c1 * lx + c0, color=color, linewidth=1)
            ax.scatter([m["params"]], [m["loss"]], marker="*", s=120, color=color, edgecolor="black", zorder=4)
        if law is not None:
            ax.plot(xs, law.loss(xs, budget / (flops_per_param_token * xs)), "--", color=color, linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("parameters N")
    ax.set_ylabel("validation loss (nats/token)")
    title = "IsoFLOP profiles: parabolas (approach 2), dashed: L(N, D) (approach 3), stars: minima"
    ax.set_title(title + (f"\nmix {fit['mix']}" if fit.get("mix") else ""), fontsize=9)
    return _save(plt, fig, [ax], path)


def plot_optimal(fits: list[dict], path: Path, at_flops=()) -> Path | None:
    """N*(C) and D*(C) for every mix: minima, approach 2's lines, approach 3's allocation."""
    plt = _plt()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), dpi=110)
    for fit in fits:
        tag = f" {fit['mix']}" if fit.get("mix") else ""
        budgets = fit["budgets"] + list(at_flops)
        cs = np.geomspace(min(budgets), max(budgets), 50)
        a2, a3 = fit.get("approach2", {}), fit.get("approach3", {})
        for ax, key, law_key in ((axes[0], "params", "params_law"), (axes[1], "tokens", "tokens_law")):
            if "minima" in a2:
                for used in (True, False):
                    ms = [m for m in a2["minima"] if m.get("used", True) == used]
                    if ms:
                        ax.scatter([m["budget"] for m in ms], [m[key] for m in ms], s=25, zorder=3,
                                   marker="o" if used else "x",
                                   label=f"IsoFLOP minima{tag}" + ("" if used else " (unbracketed, left out)"))
                law = PowerLaw(**a2[law_key])
                line = ax.plot(cs, law(cs), label=f"approach 2{tag}: C^{law.exponent:.3f}")[0]
                _band(ax, a2, key, line.get_color(), f"approach 2{tag}")
            if "law" in a3:
                law3 = ParametricLaw(**a3["law"])
                n, d = law3.optimal(cs)
                exp_n, exp_d = law3.exponents()
                line = ax.plot(cs, n if key == "params" else d, "--",
                               label=f"approach 3{tag}: C^{exp_n if key == 'params' else exp_d:.3f}")[0]
                _band(ax, a3, key, line.get_color(), f"approach 3{tag}")
    for ax, label in ((axes[0], "compute-optimal parameters N*"), (axes[1], "compute-optimal tokens D*")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("training FLOPs C")
        ax.set_ylabel(label)
    return _save(plt, fig, axes, path)


def _band(ax, approach: dict, key: str, color, label: str) -> None:
    """The bootstrap's pointwise interval of N* or D* as a shaded band, when the fit was bootstrapped."""
    band = (approach.get("bootstrap") or {}).get("frontier")
    if band:
        level = approach["bootstrap"]["level"]
        ax.fill_between(band["flops"], band[key][0], band[key][1], color=color, alpha=0.15, linewidth=0,
                        label=f"{label}: {level:.0%} bootstrap interval")


def plot_tokens(fits: list[dict], path: Path) -> Path | None:
    """Loss against training tokens at fixed model sizes under approach 3's L(N, D), from a quarter of the
    compute-optimal D to 1,000 times it: the gains past the optimum that made Meta train an 8B model on 15T
    tokens, 75 times the ~200B Chinchilla-optimal. Sizes: the compute-optimal N at the smallest and largest
    budget, and between them."""
    plt = _plt()
    laws = [(f["mix"], ParametricLaw(**f["approach3"]["law"]), f["budgets"])
            for f in fits if "law" in f.get("approach3", {})]
    if plt is None or not laws:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for mix, law, budgets in laws:
        a = law.exponents()[0]
        lo, hi = law.optimal(min(budgets))[0], law.optimal(max(budgets))[0]
        for n in np.geomspace(lo, hi, 3) if hi > lo else [lo]:
            d_opt = (n / law.G) ** (1 / a) / n  # the D at which N is compute-optimal: N = G (C/6)^a, C = 6 N D
            ds = np.geomspace(d_opt / 4, d_opt * 1000, 60)
            line = ax.plot(ds, law.loss(n, ds), label=f"N {n:,.0f}" + (f" ({mix})" if mix else ""))[0]
            ax.scatter([d_opt], [law.loss(n, d_opt)], color=line.get_color(), marker="o", zorder=3)
            ax.axhline(law.E + law.A / n**law.alpha, color=line.get_color(), linestyle=":", linewidth=0.7)
    ax.set_xscale("log")
    ax.set_xlabel("training tokens D")
    ax.set_ylabel("predicted loss (nats/token)")
    ax.set_title("Loss past the compute-optimal tokens (dots), approach 3;\ndotted: the limit E + A/N^alpha of "
                 "infinite data", fontsize=9)
    return _save(plt, fig, [ax], path)


def _iv(boot: dict | None, key: str, fmt: str = "{:.3g}") -> str:
    iv = (boot or {}).get("intervals", {}).get(key)
    return f" [{fmt.format(iv[0])}, {fmt.format(iv[1])}]" if iv else ""


def write_report(out: Path, runs: list[Run], result: dict, *, title: str = "Scaling-law fit",
                 flops_rule: str | None = None) -> Path:
    """Plots and report.md in ``out`` for ``fit_sweep``'s ``result`` over ``runs``."""
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", ""]
    if flops_rule:
        lines += [f"FLOPs per token: `{flops_rule}` "
                  + ("(6N plus attention, `model.args.flops_per_token`)." if flops_rule == "full" else "(6N).")]
        lines.append("")
    mixes = by_mix(runs)
    for fit in result["fits"]:
        rs = mixes.get(fit["mix"], [])
        head = f"## Mix `{fit['mix']}`" if fit["mix"] else "## Runs"
        lines += [head, "", f"{len(rs)} runs at {len(fit['budgets'])} budgets.", "",
                  "| run | budget C | N | D | D/N | loss |", "|---|---:|---:|---:|---:|---:|"]
        for r in sorted(rs, key=lambda r: (r.budget, r.params)):
            lines.append(f"| {r.name} | {r.budget:.3g} | {r.params:,.0f} | {r.tokens:,.0f} | {r.tokens / r.params:.1f} "
                         f"| {r.loss:.4f} |")
        a2 = fit.get("approach2", {})
        lines += [""] + (["### Approach 2: IsoFLOP profiles", ""] if a2 else [])
        if "skipped" in a2:
            lines += [f"Not fitted: {a2['skipped']}", ""]
        elif a2:
            lines += ["| budget C | runs | N* | D* | loss at N* | bracketed | in the power laws |",
                      "|---:|---:|---:|---:|---:|---|---|"]
            lines += [f"| {m['budget']:.3g} | {m['runs']} | {m['params']:,.0f} | {m['tokens']:,.0f} | {m['loss']:.4f} "
                      f"| {'yes' if m['bracketed'] else '**no**'} | {'yes' if m.get('used', True) else 'no'} |"
                      for m in a2["minima"]]
            boot = a2.get("bootstrap")
            level = f" ({boot['level']:.0%} bootstrap intervals, {boot['resamples']} resamples)" if boot else ""
            lines += ["", f"N*(C) = {a2['params_law']['coef']:.4g} C^{a2['params_law']['exponent']:.4f}"
                      f"{_iv(boot, 'params_exponent', '{:.3f}')}, "
                      f"D*(C) = {a2['tokens_law']['coef']:.4g} C^{a2['tokens_law']['exponent']:.4f}"
                      f"{_iv(boot, 'tokens_exponent', '{:.3f}')}{level}.", ""]
        a3 = fit.get("approach3", {})
        lines += ["### Approach 3: L(N, D) = E + A/N^alpha + B/D^beta", ""] if a3 else []
        if "skipped" in a3:
            lines += [f"Not fitted: {a3['skipped']}", ""]
        elif a3:
            law, boot = a3["law"], a3.get("bootstrap")
            lines += ["| parameter | value | interval |", "|---|---:|---|"]
            lines += [f"| {k} | {law[k]:.4g} | {_iv(boot, k)} |" for k in ("E", "A", "B", "alpha", "beta")]
            p = ParametricLaw(**law)
            en, ed = p.exponents()
            lines += ["", f"Huber loss (delta 1e-3) in log space from {a3['starts']} L-BFGS starts; rms log error "
                      f"{a3['rms_log_error']:.4f}. Compute-optimal exponents: N_opt ~ C^{en:.3f}, D_opt ~ C^{ed:.3f}.",
                      ""]
        if fit["optimal"]:
            lines += ["### Compute-optimal allocation", "", "| C | approach | N | D | D/N | predicted loss |",
                      "|---:|---|---:|---:|---:|---:|"]
            for row in fit["optimal"]:
                for key in ("approach2", "approach3"):
                    if key in row:
                        v = row[key]
                        boot = fit.get(key, {}).get("bootstrap")
                        c = f"{row['flops']:.3g}"
                        lines.append(f"| {c} | {key[-1]} | {v['params']:.4g}{_iv(boot, 'params@' + c)} | "
                                     f"{v['tokens']:.4g}{_iv(boot, 'tokens@' + c)} | {v['tokens'] / v['params']:.1f} "
                                     f"| {v['loss']:.4f} |")
            lines.append("")
        ho = fit.get("holdout")
        if ho and "skipped" not in ho:
            lines += ["### Held out: the largest budget", "",
                      f"Fitted on the {ho['fit_runs']} runs below budget {ho['budget']:.3g}, then asked for the runs "
                      "at it.", "", "| run | N | D | measured | approach 3 predicts | error |",
                      "|---|---:|---:|---:|---:|---:|"]
            lines += [f"| {h['name']} | {h['params']:,.0f} | {h['tokens']:,.0f} | {h['loss']:.4f} "
                      f"| {h['predicted']:.4f} | {h['error']:+.2%} |" for h in ho["held_out"]]
            a2h = ho.get("approach2", {})
            if "error" in a2h:
                lines += ["", "Approach 2's L*(C) predicts the best loss at that budget as "
                          f"{a2h['predicted_min_loss']:.4f} (measured {a2h['measured_min_loss']:.4f}, "
                          f"{a2h['error']:+.2%})."]
            lines.append("")
        if fit["warnings"]:
            lines += ["### Warnings", ""] + [f"- {w}" for w in fit["warnings"]] + [""]
        if _plt() is not None and rs:
            png = out / f"isoflops{_suffix(fit['mix'])}.png"
            plot_isoflops(rs, fit, png)
            lines += [f"![IsoFLOP profiles]({png.name})", ""]
    if result.get("ranking"):
        lines += ["## Data mixes at larger budgets", "", "| C | mixes, best first (predicted loss) |", "|---:|---|"]
        lines += [f"| {r['flops']:.3g} | " + ", ".join(f"{m['mix']} {m['loss']:.4f}" for m in r["mixes"]) + " |"
                  for r in result["ranking"]]
        lines.append("")
    at = [row["flops"] for row in result["fits"][0]["optimal"]]
    if plot_optimal(result["fits"], out / "optimal.png", at) is not None:
        lines += ["## Compute-optimal frontier", "", "![N* and D* against C](optimal.png)", ""]
    if plot_tokens(result["fits"], out / "tokens.png") is not None:
        lines += ["## Training past the optimum", "",
                  "Approach 3's loss at fixed N as D grows past the compute-optimal tokens (dots): it keeps "
                  "falling, ever more slowly, towards E + A/N^alpha.", "",
                  "![loss against tokens](tokens.png)", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def plot_task(points, result: dict, path: Path) -> Path | None:
    """predict-task's two steps: NLL against FLOPs (log-log), accuracy against NLL, the prediction starred."""
    from llamaherd.scaling.predict import Sigmoid

    plt = _plt()
    if plt is None:
        return None
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    law = PowerLaw(**result["nll_law"])
    sig = Sigmoid(**result["sigmoid"])
    s1 = [p for p in points if p.flops is not None]
    targets = [r["flops"] for r in result["predictions"]]
    cs = np.geomspace(min(p.flops for p in s1), max([p.flops for p in s1] + targets), 50)
    a1.scatter([p.flops for p in s1], [p.nll for p in s1], s=20, label="models")
    a1.plot(cs, law(cs), label=f"nll = {law.coef:.3g} C^{law.exponent:.3f}")
    s2 = [p for p in points if p.accuracy is not None]
    xs = np.linspace(min([p.nll for p in points] + [r["nll"] for r in result["predictions"]]) * 0.9,
                     max(p.nll for p in points) * 1.1, 100)
    a2.scatter([p.nll for p in s2], [p.accuracy for p in s2], s=20, label="models")
    a2.plot(xs, sig(xs), label="sigmoid")
    for r in result["predictions"]:
        a1.scatter([r["flops"]], [r["nll"]], marker="*", s=140, color="red", zorder=4)
        a2.scatter([r["nll"]], [r["accuracy"]], marker="*", s=140, color="red", zorder=4,
                   label=f"C = {r['flops']:.2g}: {r['accuracy']:.3f}")
    a1.set_xscale("log")
    a1.set_yscale("log")
    a1.set_xlabel("training FLOPs")
    a1.set_ylabel("normalised NLL of the correct answer")
    a2.set_xlabel("normalised NLL of the correct answer")
    a2.set_ylabel("accuracy")
    return _save(plt, fig, (a1, a2), path)
