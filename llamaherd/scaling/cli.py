"""`herd scaling sweep | fit | optimal | predict-task | task-points`: scaling laws from small runs."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser(
        "scaling", help="scaling laws: IsoFLOP sweeps, fits, compute-optimal sizes, task predictions",
        formatter_class=fmt,
        description="Scaling laws as Hoffmann et al. (Chinchilla) and the Llama 3 paper make them: an IsoFLOP sweep\n"
                    "of small pretraining runs, approach 2 (parabola minima -> power laws) and approach 3 (a\n"
                    "parametric L(N, D) fitted with a Huber loss in log space), the compute-optimal model size\n"
                    "and data at a budget, and a benchmark's accuracy at a budget predicted in two steps.\n"
                    "How it works, and the formulas: docs/scaling.md.",
        epilog="examples:\n"
               "  herd scaling sweep tiny --out sweeps/s1 --budgets 3e11,1e12,3e12 --dims 32,48,64,96,128\n"
               "  herd scaling fit sweeps/s1 --at-flops 1e14 --bootstrap 200\n"
               "  herd scaling optimal --flops 3.8e25 --law llama3\n"
               "  herd scaling predict-task points.jsonl --flops 1e14 --chance 0.25")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
    s = p.add_subparsers(dest="scaling_command", metavar="COMMAND")

    c = s.add_parser(
        "sweep", help="train an IsoFLOP grid of small models (resumable)", formatter_class=fmt,
        description="Pretrain one model for every compute budget x width (x data mix) into DIR/runs/NAME/, each for\n"
                    "as many steps as spend the budget (D = C / FLOPs per token, the recipe's batch and sequence\n"
                    "length), its schedule stretched to its own length; one record per finished run in\n"
                    "DIR/runs.jsonl. A width's shape: n_layers = round(dim / aspect), heads of --head-dim, KV heads\n"
                    "n_heads / --kv-ratio. Data: the recipe's data.train_dir / data.val_dir / tokenizer.path when\n"
                    "set, else built once into DIR/data as herd run builds it. Running the same command again\n"
                    "skips finished runs and resumes the others from their checkpoints; new budgets or widths\n"
                    "extend the grid.\n\n"
                    "--mix NAME=PACKED_TRAIN_DIR (repeatable) makes a data-mix sweep: every point once per mix,\n"
                    "all validated on the recipe's validation set; herd scaling fit then fits and ranks the mixes.",
        epilog="examples:\n"
               "  herd scaling sweep tiny --out sweeps/s1 --budgets 3e11,1e12,3e12 --dims 32,48,64,96,128\n"
               "  herd scaling sweep tiny --out sweeps/s3 --budgets 3e13,1e14,3e14 --sizes 5\n"
               "  herd scaling sweep tiny data.train_dir=runs/tiny/data/train data.val_dir=runs/tiny/data/val \\\n"
               "      tokenizer.path=runs/tiny/tokenizer.model train.seq_len=128 --out sweeps/s2 \\\n"
               "      --budgets 1e12,1e13 --dims 64,96,128 --workers 2\n"
               "  herd scaling sweep tiny --out sweeps/mix --budgets 1e12,3e12 --dims 32,64,96 \\\n"
               "      --mix code=packed/code --mix prose=packed/prose --dry-run")
    c.add_argument("recipe", nargs="?", default="tiny",
                   help="a built-in recipe (see `herd recipes`) or a .toml path (default: tiny)")
    c.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. train.seq_len=128")
    c.add_argument("--out", required=True, metavar="DIR", help="the sweep directory")
    c.add_argument("--budgets", required=True, help="compute budgets in FLOPs, comma-separated, e.g. 1e12,3e12,1e13")
    c.add_argument("--dims", default=None, help="model widths for every budget, comma-separated, e.g. 32,48,64,96")
    c.add_argument("--sizes", type=int, default=None, metavar="N",
                   help="instead of --dims: N model sizes per budget, widths of the shape rule whose parameters "
                        "span N*/4 to 4 N* around 20 tokens per parameter (default 5 when --dims is not given)")
    c.add_argument("--aspect", type=int, default=32, help="width per layer: n_layers = round(dim / aspect)")
    c.add_argument("--head-dim", type=int, default=16, help="attention head size")
    c.add_argument("--kv-ratio", type=int, default=2, help="query heads per KV head")
    c.add_argument("--multiple-of", type=int, default=16, help="the SwiGLU width is rounded up to a multiple of it")
    c.add_argument("--flops", default="full", choices=["full", "6n"],
                   help="FLOPs per token: full = 6N + attention (model.args.flops_per_token), 6n = 6N")
    c.add_argument("--min-steps", type=int, default=10, help="points with fewer steps are skipped")
    c.add_argument("--warmup-frac", type=float, default=0.1, help="warmup as a fraction of each run's steps")
    c.add_argument("--checkpoints", type=int, default=4, help="checkpoints a run writes (what a resume starts from)")
    c.add_argument("--mix", action="append", default=[], metavar="NAME=DIR",
                   help="a data mix: a packed training set (repeatable)")
    c.add_argument("--workers", type=int, default=1, help="runs trained at once, each in its own process")
    c.add_argument("--dry-run", action="store_true",
                   help="print the grid and stop (the data is prepared first: its tokenizer sets N)")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    c.set_defaults(func=cmd_sweep)

    f = s.add_parser(
        "fit", help="fit scaling laws to a sweep's runs", formatter_class=fmt,
        description="Fit approach 2 (per budget a parabola of loss in ln N, its minimum N*(C); power laws N*(C) and\n"
                    "D*(C) through the minima) and approach 3 (L = E + A/N^alpha + B/D^beta by a Huber loss, delta\n"
                    "1e-3, on log-space residuals, L-BFGS from the best points of Hoffmann et al.'s 4,500-point grid)\n"
                    "to a sweep's runs.jsonl, each data mix on its own. Writes fit.json, report.md, isoflops.png and\n"
                    "optimal.png. A budget whose sizes do not bracket its minimum is a warning that names it.\n\n"
                    "Input: a sweep directory or a JSONL file of runs, one object a line, with params (N), tokens\n"
                    "(D), val_loss (or loss), and optionally flops (default 6 N D), budget (the IsoFLOP group;\n"
                    "default flops), name and mix.",
        epilog="examples:\n  herd scaling fit sweeps/s1\n"
               "  herd scaling fit sweeps/s1 --at-flops 1e14,1e15 --bootstrap 200 --holdout-largest\n"
               "  herd scaling fit runs.jsonl --approach 3 --out fits/")
    f.add_argument("runs", help="a sweep directory or a runs JSONL file")
    f.add_argument("--approach", default="both", choices=["2", "3", "both"], help="which fit(s)")
    f.add_argument("--at-flops", default=None, metavar="C,...", help="budgets for the compute-optimal allocation")
    f.add_argument("--bootstrap", type=int, default=0, metavar="N",
                   help="bootstrap resamples for intervals (approach 3 uses N/2; 0: none)")
    f.add_argument("--holdout-largest", action="store_true",
                   help="also fit without the largest budget's runs and predict their losses")
    f.add_argument("--loss", default="val_loss", help="the runs' loss field (default val_loss; else loss)")
    f.add_argument("--starts", type=int, default=64,
                   help="approach 3: L-BFGS from this many of the best grid points (0: all 4,500)")
    f.add_argument("--out", default=None, metavar="DIR", help="where fit.json and the report go (default: beside "
                   "the runs)")
    f.add_argument("--json", action="store_true", help="print fit.json to stdout instead of a summary")
    f.set_defaults(func=cmd_fit)

    o = s.add_parser(
        "optimal", help="the compute-optimal model size and tokens at a budget", formatter_class=fmt,
        description="N* and D* at a compute budget under a scaling law: chinchilla (Hoffmann et al.'s approach 3:\n"
                    "E 1.69, A 406.4, B 410.7, alpha 0.34, beta 0.28; optimum under C = 6 N D), llama3 (Meta's\n"
                    "D*(C) = 0.299 C^0.537, N = C / (6 D)), or a fit.json from herd scaling fit (approach 3 by\n"
                    "default, --approach 2 for its power laws).",
        epilog="examples:\n  herd scaling optimal --flops 3.8e25 --law llama3\n"
               "  herd scaling optimal --flops 5.76e23 --law chinchilla\n"
               "  herd scaling optimal --flops 1e14,1e15 --law sweeps/s1/fit.json --approach 2")
    o.add_argument("--flops", required=True, metavar="C,...", help="compute budgets in FLOPs, comma-separated")
    o.add_argument("--law", default="chinchilla", help="chinchilla, llama3, or a fit.json path")
    o.add_argument("--approach", type=int, default=3, choices=[2, 3], help="which fit of a fit.json")
    o.add_argument("--mix", default=None, help="which data mix of a fit.json")
    o.add_argument("--json", action="store_true", help="print JSON")
    o.set_defaults(func=cmd_optimal)

    t = s.add_parser(
        "predict-task", help="predict a benchmark's accuracy at a budget (two steps)", formatter_class=fmt,
        description="The Llama 3 paper's two-step prediction: (1) a power law of the normalised NLL of the correct\n"
                    "answer against training FLOPs over the compute-optimal small models, (2) a sigmoid of\n"
                    "accuracy against that NLL over every model with an accuracy (larger ones too); the accuracy at\n"
                    "a budget is the sigmoid of the predicted NLL, with bootstrap intervals.\n\n"
                    "Input: JSONL, one model a line: {\"name\", \"flops\", \"nll\", \"accuracy\"}; flops is needed\n"
                    "for step 1 and accuracy for step 2. herd scaling task-points makes it from herd eval results.",
        epilog="examples:\n  herd scaling predict-task points.jsonl --flops 1e15 --chance 0.25\n"
               "  herd scaling predict-task points.jsonl --flops 1e15,1e16 --json pred.json --plot task.png")
    t.add_argument("points", help="the models' JSONL")
    t.add_argument("--flops", required=True, metavar="C,...", help="budgets to predict at, comma-separated")
    t.add_argument("--chance", type=float, default=None,
                   help="the sigmoid's floor, e.g. 0.25 for 4 choices (default: fitted)")
    t.add_argument("--ceiling", type=float, default=1.0, help="the sigmoid's ceiling (default 1.0)")
    t.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples (default 200)")
    t.add_argument("--json", default=None, metavar="OUT", help="write the prediction as JSON here")
    t.add_argument("--plot", default=None, metavar="PNG", help="draw both steps here")
    t.set_defaults(func=cmd_predict_task)

    e = s.add_parser(
        "task-points", help="predict-task's input from herd eval results", formatter_class=fmt,
        description="For each `herd eval MODEL --tasks TASK --log-samples --json FILE` result, one line of\n"
                    "predict-task's JSONL: the normalised NLL of the correct answer (the mean over items of\n"
                    "-log P(answer) / characters of the answer), the task's accuracy, and, when the model is a run\n"
                    "of the --sweep (its directory or a checkpoint inside it), that run's training FLOPs.",
        epilog="example:\n  for r in sweeps/s1/runs/*; do herd eval $r --tasks stdlib_docstring_mc --log-samples \\\n"
               "      --json evals/$(basename $r).json; done\n"
               "  herd scaling task-points evals/*.json --task stdlib_docstring_mc --sweep sweeps/s1 \\\n"
               "      --out points.jsonl")
    e.add_argument("evals", nargs="+", help="herd eval --json results made with --log-samples")
    e.add_argument("--task", required=True, help="the multiple-choice task's name in those results")
    e.add_argument("--sweep", default=None, metavar="DIR", help="the sweep whose runs.jsonl gives each model's FLOPs")
    e.add_argument("--metric", default="acc", choices=["acc", "acc_norm"], help="the accuracy to predict")
    e.add_argument("--optimal-only", action="store_true",
                   help="FLOPs only for each budget's best run (step 1 on compute-optimal models, as Meta)")
    e.add_argument("--out", required=True, metavar="JSONL", help="where the lines go")
    e.set_defaults(func=cmd_task_points)


def _floats(text: str, flag: str) -> list[float]:
    from llamaherd.errors import HerdError

    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise HerdError(f"{flag} {text!r}: expected numbers separated by commas, e.g. 1e12,3e12") from None
    if not values:
        raise HerdError(f"{flag}: expected at least one number")
    return values


def _ints(text: str, flag: str) -> list[int]:
    from llamaherd.errors import HerdError

    values = _floats(text, flag)
    if any(v != int(v) or v < 1 for v in values):
        raise HerdError(f"{flag} {text!r}: expected positive whole numbers")
    return [int(v) for v in values]


def cmd_sweep(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from llamaherd.config import load_config
    from llamaherd.scaling.sweep import ShapeRule, parse_mixes, sweep

    if args.recipe and "=" in args.recipe:  # `herd scaling sweep train.seq_len=128 ...`: an override, not a recipe
        args.overrides.insert(0, args.recipe)
        args.recipe = "tiny"
    console = Console(stderr=True)
    cfg = load_config(args.recipe, args.overrides)
    rule = ShapeRule(aspect=args.aspect, head_dim=args.head_dim, kv_ratio=args.kv_ratio, multiple_of=args.multiple_of)
    if args.dims and args.sizes:
        from llamaherd.errors import HerdError

        raise HerdError("--dims and --sizes: give one (widths for every budget, or a number of sizes per budget)")
    dims = _ints(args.dims, "--dims") if args.dims else []
    result = sweep(cfg, args.out, _floats(args.budgets, "--budgets"), dims, sizes=args.sizes or 5, rule=rule,
                   flops_rule=args.flops, min_steps=args.min_steps, mixes=parse_mixes(args.mix),
                   warmup_frac=args.warmup_frac, checkpoints=args.checkpoints, workers=args.workers,
                   dry_run=args.dry_run, progress=not args.no_progress, console=console)
    if args.dry_run:
        import json

        plan = json.loads((result.out / "sweep.json").read_text())
        table = Table(title=f"herd scaling sweep {args.out} (dry run)")
        for col in ("run", "layers", "heads/kv", "N", "steps", "D", "C", "D/N"):
            table.add_column(col, justify="left" if col == "run" else "right")
        for p in plan["points"].values():
            m = p["model"]
            table.add_row(p["name"], str(m["n_layers"]), f"{m['n_heads']}/{m['n_kv_heads']}", f"{p['params']:,}",
                          str(p["steps"]), f"{p['tokens']:,}", f"{p['flops']:.3g}", f"{p['tokens'] / p['params']:.1f}")
        Console().print(table)
        return 0
    if result.stopped_by:
        console.print(f"{result.stopped_by}: sweep stopped; run the same command to resume")
        return {"SIGINT": 130, "SIGTERM": 143}.get(result.stopped_by, 1)
    console.print(f"{len(result.records)} runs in {result.out / 'runs.jsonl'} ({len(result.trained)} trained now); "
                  f"fit them with: herd scaling fit {result.out}")
    return 0


def cmd_fit(args) -> int:
    import json
    import sys
    import warnings
    from pathlib import Path

    from rich.console import Console

    from llamaherd.scaling.laws import fit_sweep
    from llamaherd.scaling.report import write_report
    from llamaherd.scaling.sweep import PLAN_FILE, load_runs, runs_path

    runs = load_runs(args.runs, loss_key=args.loss)
    at = _floats(args.at_flops, "--at-flops") if args.at_flops else []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = fit_sweep(runs, approach=args.approach, bootstrap=args.bootstrap, at_flops=at,
                           holdout=args.holdout_largest, starts=args.starts)
    src = runs_path(args.runs)
    out = Path(args.out) if args.out else src.parent
    out.mkdir(parents=True, exist_ok=True)
    plan = src.parent / PLAN_FILE
    rule = json.loads(plan.read_text())["settings"]["flops_rule"] if plan.is_file() else None
    (out / "fit.json").write_text(json.dumps(result, indent=2) + "\n")
    report = write_report(out, runs, result, title=f"Scaling-law fit: {src}", flops_rule=rule)
    err = Console(stderr=True, soft_wrap=True)
    for fit in result["fits"]:
        for w in fit["warnings"]:
            err.print(f"[yellow]warning:[/] {w}", markup=True, highlight=False)
    if args.json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
        return 0
    console = Console(soft_wrap=True)
    for fit in result["fits"]:
        tag = f"mix {fit['mix']}: " if fit["mix"] else ""
        a2, a3 = fit.get("approach2", {}), fit.get("approach3", {})
        if "params_law" in a2:
            console.print(f"{tag}approach 2: N* = {a2['params_law']['coef']:.4g} C^{a2['params_law']['exponent']:.4f}, "
                          f"D* = {a2['tokens_law']['coef']:.4g} C^{a2['tokens_law']['exponent']:.4f} "
                          f"(through {sum(m['used'] for m in a2['minima'])} of {len(a2['minima'])} budgets' minima)",
                          highlight=False)
        elif a2:
            console.print(f"{tag}approach 2 not fitted: {a2['skipped']}", highlight=False)
        if "law" in a3:
            law = a3["law"]
            console.print(f"{tag}approach 3: L = {law['E']:.4g} + {law['A']:.4g}/N^{law['alpha']:.4f} + "
                          f"{law['B']:.4g}/D^{law['beta']:.4f} (rms log error {a3['rms_log_error']:.4f}, "
                          f"{a3['runs']} runs)", highlight=False)
        elif a3:
            console.print(f"{tag}approach 3 not fitted: {a3['skipped']}", highlight=False)
        for row in fit["optimal"]:
            for key in ("approach2", "approach3"):
                if key in row:
                    v = row[key]
                    console.print(f"{tag}C = {row['flops']:.3g}: approach {key[-1]} N* {v['params']:.4g}, D* "
                                  f"{v['tokens']:.4g} ({v['tokens'] / v['params']:.1f} tokens/param), loss "
                                  f"{v['loss']:.4f}", highlight=False)
        ho = fit.get("holdout")
        if ho and "held_out" in ho:
            best = next(h for h in ho["held_out"] if h["name"] == ho["best"])
            console.print(f"{tag}held out budget {ho['budget']:.3g}: best run {best['name']} loss {best['loss']:.4f}, "
                          f"approach 3 predicted {best['predicted']:.4f} ({best['error']:+.2%})", highlight=False)
    for r in result.get("ranking", []):
        console.print(f"C = {r['flops']:.3g}: mixes best first: "
                      + ", ".join(f"{m['mix']} ({m['loss']:.4f})" for m in r["mixes"]), highlight=False)
    console.print(f"fit: {out / 'fit.json'}, report: {report}", highlight=False)
    return 0


def cmd_optimal(args) -> int:
    import json

    from rich.console import Console
    from rich.table import Table

    from llamaherd.scaling.laws import CHINCHILLA, LLAMA3, LLAMA3_405B, law_from_file, optimal

    laws = {"chinchilla": CHINCHILLA, "llama3": LLAMA3}
    law = laws.get(args.law) or law_from_file(args.law, approach=args.approach, mix=args.mix)
    rows = [{"law": args.law, **optimal(law, c)} for c in _floats(args.flops, "--flops")]
    if law is LLAMA3:
        for r in rows:
            r["meta_reference"] = LLAMA3_405B
    if args.json:  # one object for one budget; one object a line (JSON Lines) for several
        print(json.dumps(rows[0], indent=2) if len(rows) == 1 else "\n".join(json.dumps(r) for r in rows))
        return 0
    table = Table(title=f"compute-optimal allocation, law {args.law}")
    for col in ("C (FLOPs)", "N params", "D tokens", "D/N", "6ND / C", "loss"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(f"{r['flops']:.3g}", _human(r["params"]), _human(r["tokens"]), f"{r['tokens_per_param']:.1f}",
                      f"{r['flops_6nd'] / r['flops']:.3f}", f"{r['loss']:.4f}" if "loss" in r else "-")
    out = Console(soft_wrap=True)
    out.print(table)
    if law is LLAMA3:
        ref = LLAMA3_405B
        for r in rows:
            out.print(f"C = {r['flops']:.3g}: N = C / (6 D) = {_human(r['params'])} parameters on "
                      f"{_human(r['tokens'])} tokens", highlight=False)
        out.print(f"Meta (Llama 3 paper, 3.2.1) at C = {ref['flops']:.3g}: {_human(ref['params'])} parameters on "
                  f"{_human(ref['tokens'])} tokens. The tokens differ by the rounding of alpha to 3 digits (0.5365 "
                  "to 0.5375 spans 15.8T to 16.8T); the parameters by the FLOPs-per-token formula: 6 N D at "
                  f"402B x 16.55T is {6 * ref['params'] * ref['tokens']:.3g} FLOPs, so Meta's 402B does not come "
                  "from C = 6 N D (see docs/scaling.md)", highlight=False)
    return 0


def _human(x: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if x >= scale:
            return f"{x / scale:.4g}{unit}"
    return f"{x:.4g}"


def cmd_predict_task(args) -> int:
    import json
    from pathlib import Path

    from rich.console import Console

    from llamaherd.scaling.predict import predict_task, read_points

    points = read_points(args.points)
    result = predict_task(points, _floats(args.flops, "--flops"), floor=args.chance, ceiling=args.ceiling,
                          bootstrap=args.bootstrap)
    console = Console(soft_wrap=True)
    law, sig = result["nll_law"], result["sigmoid"]
    console.print(f"step 1 ({result['models_step1']} models): nll = {law['coef']:.4g} C^{law['exponent']:.4f}",
                  highlight=False)
    console.print(f"step 2 ({result['models_step2']} models): accuracy = {sig['floor']:.3f} + "
                  f"{sig['ceiling'] - sig['floor']:.3f} / (1 + exp({sig['k']:.3f} (nll - {sig['mid']:.4f})))",
                  highlight=False)
    for r in result["predictions"]:
        iv = r.get("accuracy_interval")
        console.print(f"C = {r['flops']:.3g}: nll {r['nll']:.4f}, accuracy {r['accuracy']:.3f}"
                      + (f" [{iv[0]:.3f}, {iv[1]:.3f}]" if iv else ""), highlight=False)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.plot:
        from llamaherd.scaling.report import plot_task

        plot_task(points, result, Path(args.plot))
    return 0


def cmd_task_points(args) -> int:
    from llamaherd.scaling.predict import task_points, write_points

    points = task_points(args.evals, args.task, sweep_dir=args.sweep, metric=args.metric,
                         optimal_only=args.optimal_only)
    write_points(points, args.out)
    with_flops = sum(p.flops is not None for p in points)
    print(f"{len(points)} models ({with_flops} with FLOPs) -> {args.out}")
    return 0
