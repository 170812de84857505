"""Scaling laws: Chinchilla's parameters and allocation recovered from synthetic runs (approaches 2 and 3), Meta's
Llama 3 law at 3.8e25 FLOPs, one-line errors and bracketing warnings, the two-step task prediction, and a small
IsoFLOP sweep of real runs that resumes after SIGKILL."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from llamaherd.cli import main
from llamaherd.config import load_config
from llamaherd.errors import HerdError
from llamaherd.model.args import flops_per_token, num_params, preset
from llamaherd.scaling.laws import (
    CHINCHILLA,
    LLAMA3,
    Run,
    ScalingWarning,
    bootstrap_isoflop,
    bootstrap_parametric,
    check_budgets,
    fit_isoflop,
    fit_parametric,
    fit_sweep,
    optimal,
    runs_from_records,
)
from llamaherd.scaling.predict import (
    Sigmoid,
    TaskPoint,
    fit_nll_law,
    normalized_nll,
    points_from_eval,
    predict_task,
    task_points,
)
from llamaherd.scaling.sweep import ShapeRule, load_runs, parse_mixes, plan_grid, point_config, read_records

BUDGETS = [6e18, 1e19, 3e19, 6e19, 1e20, 3e20, 6e20, 1e21, 3e21]  # Chinchilla's IsoFLOP budgets


def synthetic_runs(noise: float = 0.003, seed: int = 0, law=CHINCHILLA, budgets=BUDGETS, mix: str = "") -> list[Run]:
    """An IsoFLOP grid drawn from a parametric law: 9 sizes from N_opt/4 to 4 N_opt per budget, C = 6 N D, the loss
    multiplied by exp(noise * standard normal)."""
    rng = np.random.default_rng(seed)
    runs = []
    for c in budgets:
        n_opt, _ = law.optimal(c)
        for f in np.geomspace(0.25, 4, 9):
            n = n_opt * f
            d = c / (6 * n)
            loss = float(law.loss(n, d) * math.exp(rng.normal(0, noise)))
            runs.append(Run(params=n, tokens=d, flops=c, loss=loss, budget=c, name=f"c{c:.0e}-{f:.2f}", mix=mix))
    return runs


@pytest.fixture(scope="module")
def chinchilla_runs():
    return synthetic_runs()


# --- must show 1: Chinchilla recovered ----------------------------------------------------------------------------

def test_approach3_recovers_chinchillas_parameters_and_allocation(chinchilla_runs):
    fit = fit_parametric(chinchilla_runs)
    law = fit.law
    assert abs(law.E - 1.69) < 0.05
    assert abs(law.alpha - 0.34) < 0.03 and abs(law.beta - 0.28) < 0.03
    assert 0.7 < law.A / 406.4 < 1.4 and 0.6 < law.B / 410.7 < 1.5
    assert fit.rms_log_error < 0.004  # the noise put in: 0.003
    # the allocation: exponents and N_opt, D_opt at the largest budget and far beyond it
    a, b = law.exponents()
    assert abs(a - 0.28 / 0.62) < 0.02 and abs(b - 0.34 / 0.62) < 0.02
    for c in (3e21, 1e24):
        (n_true, d_true), (n, d) = CHINCHILLA.optimal(c), law.optimal(c)
        assert abs(n / n_true - 1) < 0.15 and abs(d / d_true - 1) < 0.15, c
    # L-BFGS from the 64 best of the grid's 4,500 starts finds the optimum that 8 more found (all 4,500, as
    # Hoffmann et al. ran it, take 40 s here and give the same objective to 1e-12: docs/scaling.md)
    wider = fit_parametric(chinchilla_runs, starts=72)
    assert wider.objective == pytest.approx(fit.objective, rel=1e-6)


def test_approach2_recovers_chinchillas_exponents_and_minima(chinchilla_runs):
    fit = fit_isoflop(chinchilla_runs)
    assert not fit.warnings and all(m.bracketed for m in fit.minima)
    assert abs(fit.params_law.exponent - 0.28 / 0.62) < 0.01
    assert abs(fit.tokens_law.exponent - 0.34 / 0.62) < 0.01
    for m in fit.minima:
        n_true, d_true = CHINCHILLA.optimal(m.budget)
        assert abs(m.params / n_true - 1) < 0.08 and abs(m.tokens / d_true - 1) < 0.08, m.budget
        assert 6 * m.params * m.tokens == pytest.approx(m.budget, rel=1e-6)  # D* read off the same profile
    n, d = fit.optimal(1e24)
    n_true, d_true = CHINCHILLA.optimal(1e24)
    assert abs(n / n_true - 1) < 0.15 and abs(d / d_true - 1) < 0.15


def test_fit_command_prints_both_approaches_in_the_contract_layout(chinchilla_runs, tmp_path, capsys):
    runs = tmp_path / "runs.jsonl"  # the layout a sweep writes: params, tokens, flops, loss
    runs.write_text("".join(json.dumps({"params": r.params, "tokens": r.tokens, "flops": r.flops, "loss": r.loss})
                            + "\n" for r in chinchilla_runs))
    assert main(["scaling", "fit", str(runs), "--json", "--out", str(tmp_path / "fit")]) == 0
    out = json.loads(capsys.readouterr().out)
    par, iso = out["parametric"], out["isoflop"]
    assert set(par) == {"E", "A", "B", "alpha", "beta"}
    assert abs(par["E"] - 1.69) < 0.05 and abs(par["alpha"] - 0.34) < 0.03 and abs(par["beta"] - 0.28) < 0.03
    assert abs(iso["params_exponent"] - 0.28 / 0.62) < 0.01 and abs(iso["tokens_exponent"] - 0.34 / 0.62) < 0.01
    assert json.loads((tmp_path / "fit" / "fit.json").read_text())["parametric"] == par
    for name in ("report.md", "isoflops.png", "optimal.png", "tokens.png"):
        assert (tmp_path / "fit" / name).stat().st_size > 0, name


def test_bootstrap_intervals_hold_the_true_values(chinchilla_runs):
    boot = bootstrap_isoflop(chinchilla_runs, n=100, at_flops=[1e24])
    iv = boot["intervals"]
    assert boot["failed"] == 0
    assert iv["params_exponent"][0] < 0.28 / 0.62 < iv["params_exponent"][1]
    assert iv["params@1e+24"][0] < CHINCHILLA.optimal(1e24)[0] < iv["params@1e+24"][1]
    boot3 = bootstrap_parametric(chinchilla_runs, n=16, at_flops=[1e24])
    iv3 = boot3["intervals"]
    assert iv3["alpha"][0] < 0.34 < iv3["alpha"][1] and iv3["beta"][0] < 0.28 < iv3["beta"][1]
    assert iv3["E"][0] < 1.69 < iv3["E"][1]
    # the frontier's band (optimal.png) holds the true N*(C) and D*(C) from the smallest budget to 1e24
    for b in (boot, boot3):
        band = b["frontier"]
        assert band["flops"][0] == min(BUDGETS) and band["flops"][-1] == pytest.approx(1e24)
        n_true, d_true = CHINCHILLA.optimal(np.array(band["flops"]))
        assert np.all((np.array(band["params"][0]) < n_true) & (n_true < np.array(band["params"][1])))
        assert np.all((np.array(band["tokens"][0]) < d_true) & (d_true < np.array(band["tokens"][1])))


def test_chinchillas_closed_form_optimum_is_the_minimum_along_the_isoflop_curve():
    from scipy.optimize import minimize_scalar

    for c in (1e20, 5.76e23, 3.8e25):
        n, d = CHINCHILLA.optimal(c)
        assert 6 * n * d == pytest.approx(c, rel=1e-9)
        res = minimize_scalar(lambda x, c=c: CHINCHILLA.loss(math.exp(x), c / (6 * math.exp(x))), bounds=(10, 40),
                              method="bounded", options={"xatol": 1e-10})
        assert math.exp(res.x) == pytest.approx(n, rel=1e-4)
    # Hoffmann et al.'s printed approach-3 coefficients at Gopher's budget: 32.2B parameters on 2.98T tokens
    n, d = CHINCHILLA.optimal(5.76e23)
    assert n == pytest.approx(32.19e9, rel=1e-3) and d == pytest.approx(2.982e12, rel=1e-3)


# --- must show 2: Meta's law at 3.8e25 FLOPs --------------------------------------------------------------------

def test_llama3_law_at_the_405b_budget(capsys):
    row = optimal(LLAMA3, 3.8e25)
    # 0.299 * (3.8e25)^0.537 = 16.29T tokens; the paper's 16.55T lies within the rounding of alpha to 3 digits
    assert row["tokens"] == pytest.approx(16.29e12, rel=2e-3)
    lo, hi = (0.299 * 3.8e25**a for a in (0.5365, 0.5375))
    assert lo < 16.55e12 < hi
    # N = C / (6 D): 389B at 16.29T, 383B at the paper's 16.55T; Meta says 402B, which with 16.55T tokens
    # would spend 6 N D = 3.99e25 FLOPs, 5% over the budget
    assert row["params"] == pytest.approx(388.7e9, rel=2e-3)
    assert 3.8e25 / (6 * 16.55e12) == pytest.approx(382.7e9, rel=1e-3)
    assert 6 * 402e9 * 16.55e12 / 3.8e25 == pytest.approx(1.050, abs=1e-3)
    # the 405B model on 15.6T tokens is the budget under 6 N D (N with both embeddings, as Meta counts)
    n405 = num_params(preset("llama3.1-405b"))
    assert 6 * n405 * 15.6e12 == pytest.approx(3.8e25, rel=0.01)
    # counting attention (full 8K-token rows) adds 8% to the FLOPs of a 405B token: 6 N D is a lower bound
    args = preset("llama3.1-405b")
    assert flops_per_token(args, 8192) / (6 * n405) == pytest.approx(1.08, abs=0.01)
    assert main(["scaling", "optimal", "--flops", "3.8e25", "--law", "llama3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["flops"] == 3.8e25 and out["law"] == "llama3"
    assert out["tokens"] == pytest.approx(row["tokens"]) and out["params"] == pytest.approx(row["params"])
    assert abs(out["tokens"] / 16.55e12 - 1) < 0.03  # the tolerance on Meta's figure
    assert out["meta_reference"] == {"flops": 3.8e25, "params": 402e9, "tokens": 16.55e12}
    # the table states the implied size beside Meta's and why they differ
    assert main(["scaling", "optimal", "--flops", "3.8e25", "--law", "llama3"]) == 0
    text = capsys.readouterr().out
    assert "388.7B parameters on 16.29T tokens" in text and "402B parameters on 16.55T tokens" in text
    assert "FLOPs-per-token formula" in text
    # several budgets: one JSON object a line
    assert main(["scaling", "optimal", "--flops", "1e21,1e22", "--law", "chinchilla", "--json"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["flops"] for x in lines] == [1e21, 1e22] and all(x["tokens"] > x["params"] > 0 for x in lines)


# --- must show 4: errors and warnings --------------------------------------------------------------------------

def test_too_few_points_are_one_line_errors_saying_how_many_to_add(chinchilla_runs):
    with pytest.raises(HerdError, match=r"5 parameters but has 3 runs: add at least 2 more"):
        fit_parametric(chinchilla_runs[:3])
    one_budget = [r for r in chinchilla_runs if r.budget == 1e20]
    with pytest.raises(HerdError, match=r"has 1 budgets: add at least 1 more"):
        fit_isoflop(one_budget)
    two_sizes = [r for r in chinchilla_runs if r.budget in (1e20, 1e21)]
    two_sizes = [r for r in two_sizes if r.budget == 1e21] + [r for r in two_sizes if r.budget == 1e20][:2]
    with pytest.warns(ScalingWarning, match=r"budget 1e\+20 FLOPs has 2 model size\(s\); a parabola needs 3: "
                                            r"add at least 1 more size"):
        with pytest.raises(HerdError, match=r"approach 2 needs 2 budgets .* got 1: add at least 1 more"):
            fit_isoflop(two_sizes)
    with pytest.raises(HerdError) as e:
        fit_sweep(chinchilla_runs[:3])
    assert "approach 2" in str(e.value) and "approach 3" in str(e.value) and "\n" not in str(e.value)


def test_non_positive_budgets_and_values_are_errors(tmp_path, capsys):
    for bad in ([0], [-1e18], [float("nan")], []):
        with pytest.raises(HerdError, match="budget"):
            check_budgets(bad)
    with pytest.raises(HerdError, match="budgets must be positive"):
        optimal(CHINCHILLA, 0)
    with pytest.raises(HerdError, match=r"r1 has flops -5; expected a positive number"):
        runs_from_records([{"name": "r1", "params": 1e6, "tokens": 1e8, "flops": -5, "val_loss": 3.0}])
    with pytest.raises(HerdError, match="r2 has no params"):
        runs_from_records([{"name": "r2", "tokens": 1e8, "val_loss": 3.0}])
    assert main(["scaling", "optimal", "--flops=-1e20"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "positive" in err
    rule = ShapeRule()
    with pytest.raises(HerdError, match="budgets must be positive"):
        plan_grid(load_config("tiny"), [1e12, 0], [32], rule=rule, vocab_size=512)
    runs = tmp_path / "runs.jsonl"
    runs.write_text("".join(json.dumps({"name": f"r{i}", "params": 1e6 * (i + 1), "tokens": 1e8, "val_loss": 3.0})
                            + "\n" for i in range(3)))
    assert main(["scaling", "fit", str(runs), "--approach", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "add at least 2 more" in err


@pytest.mark.parametrize("side", ["larger", "smaller"])
def test_sizes_that_do_not_bracket_the_minimum_warn_naming_the_budget(side):
    runs = []
    for c in (1e19, 1e20, 1e21):
        n_opt, _ = CHINCHILLA.optimal(c)
        factors = np.geomspace(1 / 64, 1 / 4, 5) if side == "larger" else np.geomspace(4, 64, 5)
        if c != 1e20:
            factors = np.geomspace(1 / 4, 4, 5)
        for f in factors:
            n = n_opt * f
            runs.append(Run(n, c / (6 * n), c, float(CHINCHILLA.loss(n, c / (6 * n))), c))
    with pytest.warns(ScalingWarning) as caught:
        fit = fit_isoflop(runs)
    assert [str(w.message) for w in caught] == fit.warnings
    assert re.fullmatch(rf"budget 1e\+20 FLOPs: .*; the minimum is not bracketed: add {side} sizes", fit.warnings[0])
    assert [m.bracketed for m in fit.minima] == [True, False, True]
    # its extrapolated minimum stays out of the power laws, which the two bracketed budgets still fix
    assert [m.used for m in fit.minima] == [True, False, True]
    assert fit.warnings[1] == "approach 2's power laws leave out the unbracketed minima of budget(s) 1e+20 FLOPs"
    assert abs(fit.params_law.exponent - 0.28 / 0.62) < 0.01


# --- data mixes -------------------------------------------------------------------------------------------------

def test_data_mix_fits_rank_the_mixes():
    better = type(CHINCHILLA)(E=1.60, A=406.4, B=300.0, alpha=0.34, beta=0.28)
    runs = synthetic_runs(budgets=BUDGETS[::2], mix="web") + synthetic_runs(budgets=BUDGETS[::2], law=better,
                                                                            mix="code", seed=1)
    result = fit_sweep(runs, at_flops=[1e24])
    assert [f["mix"] for f in result["fits"]] == ["web", "code"]
    assert [m["mix"] for m in result["ranking"][0]["mixes"]] == ["code", "web"]
    with pytest.raises(HerdError, match="several data mixes"):
        fit_isoflop(runs)


# --- two-step task prediction ---------------------------------------------------------------------------------

TASK_SIGMOID = Sigmoid(floor=0.25, ceiling=1.0, k=6.0, mid=1.8)


def task_nll(c: float) -> float:
    return 3.0 * (c / 1e10) ** -0.04


def task_models(seed: int = 0) -> list[TaskPoint]:
    """Models whose NLL follows 3.0 (C/1e10)^-0.04 and whose accuracy follows a 4-choice sigmoid, with noise."""
    rng = np.random.default_rng(seed)
    out = []
    for i, c in enumerate(np.geomspace(1e10, 1e16, 13)):
        nll = task_nll(c) * math.exp(rng.normal(0, 0.01))
        out.append(TaskPoint(name=f"m{i}", nll=nll, flops=float(c),
                             accuracy=float(TASK_SIGMOID(nll) + rng.normal(0, 0.01))))
    return out


def test_two_step_prediction_of_a_held_out_larger_model():
    models = task_models()
    held = models[-1]
    result = predict_task(models[:-1], held.flops, floor=0.25, bootstrap=100)
    pred = result["predictions"][0]
    assert result["nll_law"]["exponent"] == pytest.approx(-0.04, abs=0.005)
    # against the law the models were drawn from (the held-out model's own noise is 1% of NLL, 0.03 accuracy)
    assert pred["nll"] == pytest.approx(task_nll(held.flops), rel=0.015)
    assert abs(pred["accuracy"] - float(TASK_SIGMOID(task_nll(held.flops)))) < 0.035
    assert abs(pred["accuracy"] - held.accuracy) < 0.05
    lo, hi = pred["accuracy_interval"]
    assert lo < pred["accuracy"] < hi and result["extrapolated"]
    # step 2 may use a model without FLOPs (an older, larger one): it counts there only
    extra = TaskPoint(name="old", nll=held.nll, accuracy=held.accuracy)
    result2 = predict_task([*models[:-1], extra], held.flops, floor=0.25, bootstrap=0)
    assert result2["models_step1"] == 12 and result2["models_step2"] == 13
    with pytest.raises(HerdError, match="step 1 .* 2 parameters but has 1 model.*add at least 1 more"):
        fit_nll_law(models[:1])
    with pytest.raises(HerdError, match="step 2 .* 3 parameters but has 2 model.*add at least 1 more"):
        predict_task(models[:2], 1e20)


def test_task_points_from_herd_eval_samples(tmp_path, capsys):
    samples = [{"choices": [" a", " bb", " ccc"], "gold": 1, "loglikelihoods": [-1.0, -3.0, -9.0]},
               {"choices": [" xyzw", " q"], "gold": 0, "loglikelihoods": [-2.0, -0.5]}]
    assert normalized_nll(samples) == pytest.approx((3.0 / 3 + 2.0 / 5) / 2)
    sweep = tmp_path / "sweep"
    (sweep / "runs" / "c1e9-d32" / "checkpoints" / "step_0000010").mkdir(parents=True)
    (sweep / "runs" / "c1e9-d64").mkdir(parents=True)
    records = [{"name": "c1e9-d32", "budget": 1e9, "flops": 1.01e9, "val_loss": 2.0, "run_dir": "runs/c1e9-d32"},
               {"name": "c1e9-d64", "budget": 1e9, "flops": 0.99e9, "val_loss": 2.5, "run_dir": "runs/c1e9-d64"}]
    (sweep / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    files = []
    for i, model in enumerate([sweep / "runs" / "c1e9-d32" / "checkpoints" / "step_0000010",
                               sweep / "runs" / "c1e9-d64", tmp_path / "elsewhere"]):
        f = tmp_path / f"eval{i}.json"
        f.write_text(json.dumps({"model": str(model), "tasks": {"mc": {"acc": 0.5 + i / 10, "samples": samples}}}))
        files.append(f)
    points = task_points(files, "mc", sweep_dir=sweep)
    assert [(p.name, p.flops, p.accuracy) for p in points] == [("c1e9-d32", 1.01e9, 0.5), ("c1e9-d64", 0.99e9, 0.6),
                                                                (str(tmp_path / "elsewhere"), None, 0.7)]
    assert task_points(files, "mc", sweep_dir=sweep, optimal_only=True)[1].flops is None  # not its budget's best
    with pytest.raises(HerdError, match="no task 'other'"):
        points_from_eval(files[0], "other")
    out = tmp_path / "points.jsonl"
    assert main(["scaling", "task-points", *map(str, files), "--task", "mc", "--sweep", str(sweep),
                 "--out", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 3 and "2 with FLOPs" in capsys.readouterr().out


def test_predict_task_command(tmp_path, capsys):
    points = tmp_path / "points.jsonl"
    points.write_text("".join(json.dumps({"name": p.name, "flops": p.flops, "nll": p.nll, "accuracy": p.accuracy})
                              + "\n" for p in task_models()))
    png, out = tmp_path / "task.png", tmp_path / "pred.json"
    assert main(["scaling", "predict-task", str(points), "--flops", "1e17", "--chance", "0.25", "--bootstrap", "20",
                 "--json", str(out), "--plot", str(png)]) == 0
    assert "C = 1e+17" in capsys.readouterr().out and png.stat().st_size > 0
    assert json.loads(out.read_text())["predictions"][0]["flops"] == 1e17


# --- the sweep --------------------------------------------------------------------------------------------------

def sweep_recipe(corpus: Path, tmp: Path) -> Path:
    """Very small runs on the byte-level corpus: batch 4 x 64 tokens, 2 validation batches."""
    lines = ['name = "sweep"', "[model]", 'preset = "tiny"',
             "[data]", f'train_dir = "{corpus / "train"}"', f'val_dir = "{corpus / "val"}"',
             "[tokenizer]", f'path = "{corpus / "tokenizer.model"}"',
             "[train]", "batch_size = 4", "seq_len = 64", "lr = 0.004", "eval_batches = 2", "log_every = 5",
             "seed = 0"]
    path = tmp / "recipe.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_grid_spends_each_budget_and_shapes_models_by_the_rule(byte_corpus, tmp_path):
    cfg = load_config(sweep_recipe(byte_corpus, tmp_path))
    rule = ShapeRule(aspect=32, head_dim=16, kv_ratio=2)
    assert rule.shape(96) == {"dim": 96, "n_layers": 3, "n_heads": 6, "n_kv_heads": 3, "multiple_of": 16}
    points, skipped = plan_grid(cfg, [1e9, 4e9], [16, 32, 48, 64], rule=rule, vocab_size=512, min_steps=8)
    for p in points:
        per_step = p.flops_per_token * 4 * 64
        assert abs(p.flops - p.budget) <= per_step / 2 and p.tokens == p.steps * 256
        assert p.name == f"c{p.budget:.0e}".replace("+0", "").replace("+", "") + f"-d{p.dim}"
    assert {(s["budget"], s["dim"]) for s in skipped} == {(1e9, 64)}  # 1e9 buys the 64-wide model < 8 steps
    mixes = parse_mixes([f"a={byte_corpus / 'train'}", f"b={byte_corpus / 'val'}"])
    points, _ = plan_grid(cfg, [4e9], [32], rule=rule, vocab_size=512, mixes=list(mixes))
    assert [p.name for p in points] == ["c4e9-d32-a", "c4e9-d32-b"]
    c = point_config(cfg, points[1], train_dir=mixes["b"])
    assert c.data.train_dir == mixes["b"] and c.train.steps == points[1].steps and c.train.eval_every == c.train.steps
    assert c.model.overrides == rule.shape(32)
    with pytest.raises(HerdError, match="NAME=PACKED_TRAIN_DIR"):
        parse_mixes(["nodir"])
    with pytest.raises(HerdError, match="not a packed dataset"):
        parse_mixes([f"x={tmp_path}"])


def test_sizes_per_budget_centre_each_profile_on_20_tokens_per_parameter(byte_corpus, tmp_path):
    cfg = load_config(sweep_recipe(byte_corpus, tmp_path))
    rule = ShapeRule(aspect=32, head_dim=16, kv_ratio=2)
    budgets = [3e10, 3e12]
    points, skipped = plan_grid(cfg, budgets, [], sizes=5, rule=rule, vocab_size=512, min_steps=8)
    assert not skipped
    for budget in budgets:
        profile = sorted((p for p in points if p.budget == budget), key=lambda p: p.params)
        assert len(profile) == 5 and len({p.dim for p in profile}) == 5 and all(p.steps >= 8 for p in profile)
        centre = math.sqrt(budget / 120)  # N* at 20 tokens per parameter under C = 6 N D
        assert profile[0].params < centre < profile[-1].params  # the profile brackets Chinchilla's optimum
        assert profile[-1].params / profile[0].params > 4
    # a larger budget's profile sits at larger models
    small, large = ([p.params for p in points if p.budget == b] for b in budgets)
    assert np.median(large) > np.median(small)
    with pytest.raises(HerdError, match="--sizes 0: expected 1 or more"):
        plan_grid(cfg, budgets, [], sizes=0, rule=rule, vocab_size=512)
    with pytest.raises(HerdError, match="--dims 32,48,64,96, or --sizes 5"):
        plan_grid(cfg, budgets, [], rule=rule, vocab_size=512)
    assert main(["scaling", "sweep", "tiny", "--out", str(tmp_path / "s"), "--budgets", "1e10", "--dims", "32",
                 "--sizes", "3"]) == 2


def herd(*args) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "llamaherd.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def test_sweep_of_tiny_models_resumes_after_sigkill_then_fits(byte_corpus, tmp_path, capsys):
    """Must show: a real IsoFLOP sweep, killed in its second run, run again: finished runs are skipped (their
    files untouched), the killed one resumes from its checkpoint, and every grid point ends in runs.jsonl once."""
    out = tmp_path / "sweep"
    argv = ["scaling", "sweep", str(sweep_recipe(byte_corpus, tmp_path)), "--out", str(out), "--budgets", "1e9,2e9",
            "--dims", "16,32,48", "--min-steps", "8", "--checkpoints", "4", "--no-progress"]
    proc = herd(*argv)
    deadline = time.time() + 120
    killed_in = None
    while time.time() < deadline and proc.poll() is None:
        if (out / "runs.jsonl").is_file():
            done = {r["name"] for r in read_records(out)}
            plan = json.loads((out / "sweep.json").read_text())
            nxt = [n for n in plan["points"] if n not in done]
            ckpts = [p for n in nxt for p in (out / "runs" / n / "checkpoints").glob("step_*")]
            if done and ckpts:
                proc.send_signal(signal.SIGKILL)
                killed_in = ckpts[0].parent.parent.name
                break
        time.sleep(0.005)
    proc.wait(timeout=30)
    assert killed_in is not None, proc.stderr.read()
    first = {r["name"]: r for r in read_records(out)}
    assert killed_in not in first
    untouched = {n: (out / "runs" / n / "metrics.jsonl").read_bytes() for n in first}
    proc = herd(*argv)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    records = {r["name"]: r for r in read_records(out)}
    plan = json.loads((out / "sweep.json").read_text())
    assert sorted(records) == sorted(plan["points"]) and len(records) == 6
    assert len((out / "runs.jsonl").read_text().splitlines()) == 6
    for n, data in untouched.items():
        assert (out / "runs" / n / "metrics.jsonl").read_bytes() == data and records[n] == first[n]
    assert records[killed_in]["resumed_from"] > 0
    for r in records.values():
        assert r["val_loss"] > 0 and abs(r["flops"] - r["budget"]) / r["budget"] < 0.1
        assert r["steps"] == len([x for x in map(json.loads, (out / "runs" / r["name"] / "metrics.jsonl")
                                                 .read_text().splitlines()) if "loss" in x])
    # a third call has nothing to do
    proc = herd(*argv)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "(0 trained now)" in err
    # and the runs fit
    assert main(["scaling", "fit", str(out), "--approach", "3", "--at-flops", "1e10"]) == 0
    fit = json.loads((out / "fit.json").read_text())
    law = fit["fits"][0]["approach3"]["law"]
    assert law["E"] > 0 and fit["fits"][0]["optimal"][0]["approach3"]["params"] > 0
    assert (out / "report.md").read_text().startswith("# Scaling-law fit") and (out / "optimal.png").is_file()
    capsys.readouterr()
    # predict-task's input from real `herd eval --log-samples` results on two of the sweep's runs
    choices = {"text": [" +1", " *2", " -3"], "label": ["A", "B", "C"]}
    items = [{"question": f"def f{i}(x): return x", "choices": choices, "answerKey": "ABC"[i % 3]} for i in range(4)]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(x) + "\n" for x in items))
    evals = []
    for name in ("c1e9-d16", "c2e9-d32"):
        evals.append(tmp_path / f"{name}.json")
        assert main(["eval", str(out / "runs" / name), "--tasks", f"{tmp_path / 'mc.jsonl'}:arc", "--log-samples",
                     "--json", str(evals[-1]), "--device", "cpu"]) == 0
    points = task_points(evals, f"{tmp_path / 'mc.jsonl'}:arc", sweep_dir=out)
    assert [p.flops for p in points] == [records["c1e9-d16"]["flops"], records["c2e9-d32"]["flops"]]
    assert all(p.nll > 0 and 0 <= p.accuracy <= 1 for p in points)


def test_sweep_refuses_other_settings_in_the_same_directory(byte_corpus, tmp_path):
    from llamaherd.scaling.sweep import sweep

    cfg = load_config(sweep_recipe(byte_corpus, tmp_path))
    out = tmp_path / "s"
    sweep(cfg, out, [1e9], [16, 32], min_steps=8, dry_run=True, progress=False)
    cfg.train.lr = 1e-3
    with pytest.raises(HerdError, match="other settings"):
        sweep(cfg, out, [1e9], [16, 32], min_steps=8, dry_run=True, progress=False)


@pytest.mark.usefixtures("one_thread")
def test_data_mix_sweep_trains_each_point_on_each_mix(byte_corpus, tmp_path):
    """Each mix is its own training set, validated on the recipe's validation set; a mix name may not change its
    data later."""
    from llamaherd.scaling.sweep import sweep

    cfg = load_config(sweep_recipe(byte_corpus, tmp_path))
    mixes = parse_mixes([f"train={byte_corpus / 'train'}", f"val={byte_corpus / 'val'}"])
    out = tmp_path / "mix"
    result = sweep(cfg, out, [1e9], [16, 32], min_steps=8, mixes=mixes, progress=False)
    records = {r["name"]: r for r in result.records}
    assert sorted(records) == ["c1e9-d16-train", "c1e9-d16-val", "c1e9-d32-train", "c1e9-d32-val"]
    for name, r in records.items():
        run_cfg = load_config(out / "runs" / name / "config.toml")
        assert run_cfg.data.train_dir == mixes[r["mix"]] and run_cfg.data.val_dir == str(byte_corpus / "val")
    for dim in (16, 32):  # the same model, seed and steps on other data: another loss
        assert records[f"c1e9-d{dim}-val"]["val_loss"] != records[f"c1e9-d{dim}-train"]["val_loss"]
    assert {r.mix for r in load_runs(out)} == {"train", "val"}
    with pytest.raises(HerdError, match="--mix val: this sweep trained mix val on"):
        sweep(cfg, out, [1e9], [16, 32], min_steps=8, mixes={"val": mixes["train"]}, progress=False)
