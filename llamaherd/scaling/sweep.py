"""IsoFLOP sweeps: many small pretraining runs on a grid of compute budgets and model sizes.

    herd scaling sweep RECIPE --out DIR --budgets 1e12,3e12,1e13 --dims 32,48,64,96,128
    herd scaling sweep RECIPE --out DIR --budgets 1e12,3e12,1e13 --sizes 5

For each budget C and each width in ``dims`` (or, with ``sizes``, that many widths per budget around
Chinchilla's 20 tokens per parameter: ``auto_dims``) a model is shaped by a ``ShapeRule`` (layers from the
width's aspect ratio, heads of a fixed size, grouped-query KV heads) and trained for as many steps as
spend C: D = C / FLOPs-per-token tokens, the recipe's batch and sequence length fixed, the learning-rate
schedule (warmup, cosine) stretched to each run's own length, as Hoffmann et al. insist. Points that
would get fewer than ``min_steps`` steps are skipped and reported.

FLOPs per token (``flops_rule``): "full" (default) is ``model.args.flops_per_token``: 6 N for the weight
matmuls (N counts every matmul weight, the output head included, the embedding lookup excluded) plus the
attention score and value matmuls, 12 n_layers dim seq_len, which for these small models is a large
share; "6n" is Kaplan's and Chinchilla's 6 N D, without attention.

    DIR/
        sweep.json          the plan: settings (checked on resume), the grid, skipped points
        data/               the packed corpus and tokenizer, built once when the recipe names none
        runs/NAME/          one ordinary pretraining run per point (resumable: checkpoints, metrics.jsonl)
        runs.jsonl          one record per finished run (see ``record_of``), rewritten atomically

A killed sweep run again skips the runs in runs.jsonl and resumes the others from their checkpoints.
A data-mix sweep (``mixes``: name -> packed training set) trains every point once per mix, all validated
on the recipe's validation set, so that each mix gets its own fit and the mixes can be compared at a
larger budget (Llama 3's way of choosing a data mix).
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from llamaherd.config import RunConfig, dump_config, model_args
from llamaherd.errors import HerdError
from llamaherd.model.args import ModelArgs, flops_per_token, num_params
from llamaherd.scaling.laws import Run, check_budgets, runs_from_records

FLOPS_RULES = ("full", "6n")
RUNS_FILE = "runs.jsonl"
PLAN_FILE = "sweep.json"


@dataclass
class ShapeRule:
    """A model's shape from its width: n_layers = round(dim / aspect) (at least 1), heads of ``head_dim``,
    n_kv_heads = n_heads / kv_ratio (the largest divisor of n_heads not above it, at least 1), the SwiGLU
    width rounded to ``multiple_of``. Llama 3 8B has aspect 128, head_dim 128 and kv_ratio 4."""

    aspect: int = 32
    head_dim: int = 16
    kv_ratio: int = 2
    multiple_of: int = 16

    def __post_init__(self) -> None:
        for name in ("aspect", "head_dim", "kv_ratio", "multiple_of"):
            if getattr(self, name) < 1:
                raise HerdError(f"shape rule: {name} {getattr(self, name)}: expected 1 or more")
        if self.head_dim % 2:
            raise HerdError(f"shape rule: head_dim {self.head_dim} must be even for RoPE")

    def shape(self, dim: int) -> dict:
        if dim < self.head_dim or dim % self.head_dim:
            raise HerdError(f"width {dim}: expected a multiple of the head size {self.head_dim}")
        n_heads = dim // self.head_dim
        want = max(1, n_heads // self.kv_ratio)
        n_kv = max(d for d in range(1, want + 1) if n_heads % d == 0)
        return {"dim": dim, "n_layers": max(1, round(dim / self.aspect)), "n_heads": n_heads, "n_kv_heads": n_kv,
                "multiple_of": self.multiple_of}


def matmul_params(args: ModelArgs) -> int:
    """N of the FLOPs count: every matmul weight, the output head included, the embedding lookup and the
    norms excluded (PaLM's appendix B; what ``flops_per_token`` multiplies by 6)."""
    return num_params(args, embeddings=False) - (2 * args.n_layers + 1) * args.dim + args.vocab_size * args.dim


def token_flops(args: ModelArgs, seq_len: int, rule: str) -> float:
    if rule == "full":
        return flops_per_token(args, seq_len)
    if rule == "6n":
        return 6.0 * matmul_params(args)
    raise HerdError(f"FLOPs rule {rule!r}: expected one of {', '.join(FLOPS_RULES)}")


def budget_tag(budget: float) -> str:
    """1e12 -> '1e12', 3e12 -> '3e12', 1.5e13 -> '1.5e13': the budget part of a run's name."""
    mantissa, exp = f"{budget:.2e}".split("e")
    return f"{float(mantissa):g}e{int(exp)}"


@dataclass
class GridPoint:
    name: str
    budget: float
    dim: int
    model: dict  # the ModelArgs fields the shape rule sets
    params: int  # N (matmul weights)
    flops_per_token: float
    steps: int
    tokens: int  # D = steps x batch_size x seq_len
    flops: float  # D x flops_per_token: the budget up to a step's rounding
    mix: str = ""


TOKENS_PER_PARAM = 20  # Hoffmann et al.'s compute-optimal ratio: the centre of a profile chosen by --sizes
SIZES_SPREAD = 16.0  # ... which spans N*/4 to 4 N*, as Hoffmann et al.'s profiles do
MAX_WIDTH_HEADS = 256  # the widest model --sizes considers: 256 heads


def auto_dims(cfg: RunConfig, budget: float, sizes: int, *, rule: ShapeRule, vocab_size: int,
              flops_rule: str = "full", min_steps: int = 10) -> list[int]:
    """``sizes`` widths for the IsoFLOP profile of ``budget``: of the widths the shape rule makes (multiples of
    the head size) that get ``min_steps`` steps or more, those whose N lie nearest a geometric grid from N*/4
    to 4 N* around Chinchilla's 20 tokens per parameter, N* = sqrt(C / (6 x 20)). Fewer when fewer fit."""
    if sizes < 1:
        raise HerdError(f"--sizes {sizes}: expected 1 or more model sizes per budget (3 or more to fit)")
    tcfg = cfg.train
    rows = tcfg.batch_size * tcfg.grad_accum * tcfg.seq_len
    candidates = []  # (ln N, width)
    for k in range(1, MAX_WIDTH_HEADS + 1):
        dim = k * rule.head_dim
        c = copy.deepcopy(cfg)
        c.model.overrides.update(rule.shape(dim))
        args = model_args(c, vocab_size=vocab_size)
        if round(budget / (token_flops(args, tcfg.seq_len, flops_rule) * rows)) >= min_steps:
            candidates.append((math.log(matmul_params(args)), dim))
    centre = math.log(math.sqrt(budget / (6 * TOKENS_PER_PARAM)))
    half = math.log(SIZES_SPREAD) / 2
    targets = [centre + half * (2 * i / (sizes - 1) - 1) for i in range(sizes)] if sizes > 1 else [centre]
    chosen: list[int] = []
    for t in targets:
        free = [(abs(x - t), dim) for x, dim in candidates if dim not in chosen]
        if free:
            chosen.append(min(free)[1])
    return sorted(chosen)


def plan_grid(cfg: RunConfig, budgets, dims, *, rule: ShapeRule, vocab_size: int, flops_rule: str = "full",
              min_steps: int = 10, mixes=("",), sizes: int | None = None) -> tuple[list[GridPoint], list[dict]]:
    """The runs of an IsoFLOP grid (every budget x width x mix) and the points skipped (too few steps). The
    widths are ``dims`` for every budget or, when ``dims`` is empty and ``sizes`` given, ``auto_dims``'s per
    budget."""
    budgets = check_budgets(budgets)
    dims = sorted({int(d) for d in dims or ()})
    if not dims and sizes is None:
        raise HerdError("no model width given; expected several, e.g. --dims 32,48,64,96, or --sizes 5")
    if flops_rule not in FLOPS_RULES:
        raise HerdError(f"FLOPs rule {flops_rule!r}: expected one of {', '.join(FLOPS_RULES)}")
    tcfg = cfg.train
    rows = tcfg.batch_size * tcfg.grad_accum * tcfg.seq_len  # tokens a step
    points, skipped = [], []
    for budget in sorted(set(budgets)):
        widths = dims or auto_dims(cfg, budget, sizes, rule=rule, vocab_size=vocab_size, flops_rule=flops_rule,
                                   min_steps=min_steps)
        if not widths:
            skipped.append({"budget": budget, "dim": None, "steps": 0,
                            "reason": f"no width of the shape rule gets {min_steps} steps"})
        for dim in widths:
            shape = rule.shape(dim)
            c = copy.deepcopy(cfg)
            c.model.overrides.update(shape)
            args = model_args(c, vocab_size=vocab_size)
            fpt = token_flops(args, tcfg.seq_len, flops_rule)
            steps = round(budget / (fpt * rows))
            if steps < min_steps:
                skipped.append({"budget": budget, "dim": dim, "steps": steps,
                                "reason": f"{steps} steps < min_steps {min_steps}"})
                continue
            for mix in mixes:
                name = f"c{budget_tag(budget)}-d{dim}" + (f"-{mix}" if mix else "")
                points.append(GridPoint(name=name, budget=budget, dim=dim, model=shape, params=matmul_params(args),
                                        flops_per_token=fpt, steps=steps, tokens=steps * rows,
                                        flops=steps * rows * fpt, mix=mix))
    return points, skipped


def point_config(cfg: RunConfig, point: GridPoint, *, train_dir: str, warmup_frac: float = 0.1,
                 checkpoints: int = 4) -> RunConfig:
    """The pretraining config of one grid point: the recipe with the point's shape and length; warmup a
    fraction of the run; one evaluation, at the end; ``checkpoints`` checkpoints along the way for resuming."""
    c = copy.deepcopy(cfg)
    c.name = point.name
    c.model.overrides.update(point.model)
    c.data.train_dir = train_dir
    t = c.train
    t.steps = point.steps
    t.warmup_steps = max(1, round(warmup_frac * point.steps))
    t.eval_every = point.steps
    t.log_every = max(1, min(t.log_every, point.steps))
    c.checkpoint.every = max(1, math.ceil(point.steps / max(checkpoints, 1)))
    c.checkpoint.keep = 1
    return c


def record_of(point: GridPoint, cfg: RunConfig, result, seconds: float, run_dir: str) -> dict:
    """One line of runs.jsonl: what was trained (N, D, C and the shape) and how it ended (losses, time).
    ``flops`` uses the sweep's FLOPs rule, ``flops_6nd`` is 6 N D for comparison."""
    return {"name": point.name, "mix": point.mix, "budget": point.budget, "params": point.params,
            "tokens": point.tokens, "flops": point.flops, "flops_6nd": 6.0 * point.params * point.tokens,
            "flops_per_token": point.flops_per_token, **point.model, "steps": point.steps,
            "batch_size": cfg.train.batch_size * cfg.train.grad_accum, "seq_len": cfg.train.seq_len,
            "lr": cfg.train.lr, "val_loss": result.val_loss, "val_bpb": result.val_bpb,
            "train_loss": result.train_loss, "seconds": seconds, "tokens_per_s": result.tokens_per_s,
            "resumed_from": result.resumed_from, "run_dir": run_dir}


# --- runs.jsonl ---------------------------------------------------------------------------------------------

def runs_path(path: str | Path) -> Path:
    """A sweep directory's runs.jsonl, or the JSONL file itself."""
    path = Path(path)
    return path / RUNS_FILE if path.is_dir() else path


def read_records(path: str | Path) -> list[dict]:
    """The records of a runs.jsonl (or of a sweep directory), the last one of each name kept."""
    from llamaherd.data.records import read_records as rows

    path = runs_path(path)
    if not path.is_file():
        raise HerdError(f"{path}: no such file; expected a sweep directory or a JSONL of runs")
    records: dict[str, dict] = {}
    for where, r in rows(path):
        records[str(r.get("name", where))] = r
    return list(records.values())


def load_runs(path: str | Path, *, loss_key: str = "val_loss") -> list[Run]:
    return runs_from_records(read_records(path), loss_key=loss_key, where=str(runs_path(path)))


def _write_records(path: Path, records: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    os.replace(tmp, path)


# --- data ----------------------------------------------------------------------------------------------------

def prepare_data(cfg: RunConfig, out: Path, *, progress: bool = True, console=None) -> RunConfig:
    """The recipe with ``data.train_dir``, ``data.val_dir`` and ``tokenizer.path`` pointing at packed data:
    the recipe's own when it names them, else built once into ``out/data`` by the main job's stages
    (corpus -> curation -> tokenizer -> pack), reused when the sweep runs again."""
    from llamaherd.train import run as main_job

    cfg = copy.deepcopy(cfg)
    if cfg.data.train_dir:
        if not cfg.tokenizer.path or cfg.tokenizer.path == "meta":
            if cfg.tokenizer.path == "meta":
                cfg.tokenizer.path = str(main_job.meta_tokenizer_file())
            else:
                raise HerdError("data.train_dir is set but tokenizer.path is not: name the tokenizer that packed it")
        for key in ("train_dir", "val_dir"):
            value = getattr(cfg.data, key)
            if value and not (Path(value) / "meta.json").is_file():
                raise HerdError(f"data.{key} {value}: not a packed dataset (no meta.json); "
                                "make one with herd data pack")
        if not cfg.data.val_dir:
            raise HerdError("data.val_dir is not set: a sweep compares validation losses; name a packed validation set")
        return cfg
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    main_job.check_same_data(cfg, data)
    pipeline = None
    if cfg.curate.stages:
        from llamaherd.data.curate.pipeline import pipeline_from_tables

        pipeline = pipeline_from_tables(cfg.curate.stages, {"shard_docs": cfg.curate.shard_docs}, "curate.stages")
    main_job.stage_corpus(cfg, data)
    main_job.stage_curate(cfg, data, pipeline, progress, console)
    main_job.stage_tokenizer(cfg, data, progress)
    packed = main_job.stage_pack(cfg, data, progress)
    if "val" not in packed:
        raise HerdError("data.val_inputs is empty: a sweep compares validation losses; give validation text")
    cfg.data.train_dir, cfg.data.val_dir = str(data / "data" / "train"), str(data / "data" / "val")
    cfg.tokenizer.path = str(data / "tokenizer.model")
    return cfg


def parse_mixes(items: list[str]) -> dict[str, str]:
    """``NAME=PACKED_TRAIN_DIR`` items -> {name: dir}; names are plain words (they end run names)."""
    mixes: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise HerdError(f"--mix {item!r}: expected NAME=PACKED_TRAIN_DIR")
        if not name.replace("_", "").replace(".", "").isalnum():
            raise HerdError(f"--mix {item!r}: the name may hold letters, digits, '_' and '.' only")
        if name in mixes:
            raise HerdError(f"--mix {name}: given twice")
        if not (Path(path) / "meta.json").is_file():
            raise HerdError(f"--mix {name}: {path} is not a packed dataset (no meta.json); "
                            "make one with herd data pack")
        mixes[name] = path
    return mixes


# --- the sweep -------------------------------------------------------------------------------------------------

@dataclass
class SweepResult:
    out: Path
    records: list[dict]  # every finished run, this call's and earlier calls'
    trained: list[str] = field(default_factory=list)  # names this call trained (or finished)
    skipped: list[dict] = field(default_factory=list)  # grid points left out (too few steps)
    stopped_by: str | None = None  # a signal that stopped the sweep


def _settings(cfg: RunConfig, rule: ShapeRule, flops_rule: str, warmup_frac: float, checkpoints: int) -> dict:
    """What every run of a sweep shares; a sweep directory refuses to continue with other settings."""
    return {"config": dump_config(cfg), "shape_rule": asdict(rule), "flops_rule": flops_rule,
            "warmup_frac": warmup_frac, "checkpoints": checkpoints}


def _check_plan(out: Path, settings: dict, mixes: dict) -> dict:
    path = out / PLAN_FILE
    if not path.is_file():
        return {"points": {}, "mixes": {}}
    plan = json.loads(path.read_text())
    old = plan.get("settings", {})
    changed = [k for k in settings if old.get(k) != settings[k]]
    if changed:
        raise HerdError(f"{out} holds a sweep with other settings ({', '.join(changed)} differ); "
                        "use another --out, or the same recipe, overrides and options")
    for name, path_ in mixes.items():
        if plan.get("mixes", {}).get(name, path_) != path_:
            raise HerdError(f"--mix {name}: this sweep trained mix {name} on {plan['mixes'][name]}, not {path_}")
    return plan


def sweep(cfg: RunConfig, out: str | Path, budgets, dims, *, rule: ShapeRule | None = None, sizes: int | None = None,
          flops_rule: str = "full", min_steps: int = 10, mixes: dict[str, str] | None = None,
          warmup_frac: float = 0.1, checkpoints: int = 4, workers: int = 1, dry_run: bool = False,
          progress: bool = True, console=None) -> SweepResult:
    """Run (or resume) an IsoFLOP sweep into ``out``; see the module's docstring. ``workers`` > 1 trains
    that many runs at once, each in a process of its own with an equal share of the CPU threads."""
    from rich.console import Console

    from llamaherd.tokenizer import Tokenizer

    console = console or Console(stderr=True)
    rule = rule or ShapeRule()
    out = Path(out)
    if workers < 1:
        raise HerdError(f"--workers {workers}: expected 1 or more")
    if not 0 <= warmup_frac < 1:
        raise HerdError(f"warmup fraction {warmup_frac}: expected 0 <= fraction < 1")
    check_budgets(budgets)  # a bad budget fails before any data is built
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise HerdError(f"sweep directory {out} cannot be created: {e.strerror or e}") from None
    settings = _settings(cfg, rule, flops_rule, warmup_frac, checkpoints)
    mixes = dict(mixes or {})
    plan = _check_plan(out, settings, mixes)
    cfg = prepare_data(cfg, out, progress=progress, console=console)
    vocab = Tokenizer.from_file(cfg.tokenizer.path).n_words
    points, skipped = plan_grid(cfg, budgets, dims, rule=rule, vocab_size=vocab, flops_rule=flops_rule,
                                min_steps=min_steps, mixes=list(mixes) or [""], sizes=sizes)
    for s in skipped:
        width = f" width {s['dim']}" if s["dim"] else ""
        console.print(f"[yellow]skipped[/] budget {s['budget']:.3g}{width}: {s['reason']}")
    if not points:
        raise HerdError(f"every point of the grid has fewer than {min_steps} steps: give larger budgets or "
                        "smaller widths (or a smaller train.batch_size / train.seq_len)")
    plan["settings"] = settings
    plan["mixes"] = {**plan.get("mixes", {}), **mixes}
    plan["points"] = {**plan.get("points", {}), **{p.name: asdict(p) for p in points}}
    plan["data"] = {"train_dir": cfg.data.train_dir, "val_dir": cfg.data.val_dir, "tokenizer": cfg.tokenizer.path}
    (out / PLAN_FILE).write_text(json.dumps(plan, indent=2) + "\n")
    path = out / RUNS_FILE
    records = {r["name"]: r for r in read_records(path)} if path.is_file() else {}
    todo = [p for p in points if p.name not in records]
    result = SweepResult(out=out, records=list(records.values()), skipped=skipped)
    if dry_run or not todo:
        return result
    jobs = []
    for p in todo:
        c = point_config(cfg, p, train_dir=mixes.get(p.mix, cfg.data.train_dir), warmup_frac=warmup_frac,
                         checkpoints=checkpoints)
        jobs.append((p, c, out / "runs" / p.name))

    def finished(point: GridPoint, c: RunConfig, train, seconds: float) -> None:
        records[point.name] = record_of(point, c, train, seconds, f"runs/{point.name}")
        _write_records(path, list(records.values()))
        result.trained.append(point.name)

    with _bar(progress, console) as bar:
        task = bar.add_task("sweep", total=sum(p.flops for p, _, _ in jobs), runs=f"0/{len(jobs)}")
        done = 0

        def advance(point, train):
            nonlocal done
            done += 1
            bar.update(task, advance=point.flops, runs=f"{done}/{len(jobs)}")
            bar.console.print(f"{point.name}: N {point.params:,} D {point.tokens:,} "
                              f"val loss {train.val_loss:.4f}" + (f" (resumed at step {train.resumed_from})"
                                                                 if train.resumed_from else ""))

        if workers == 1:
            from llamaherd.train.pretrain import pretrain

            for point, c, run_dir in jobs:
                t0 = time.perf_counter()
                train = pretrain(c, run_dir, progress=False, console=bar.console)
                if train.stopped_by:
                    result.stopped_by = train.stopped_by
                    break
                finished(point, c, train, time.perf_counter() - t0)
                advance(point, train)
        else:
            result.stopped_by = _run_parallel(jobs, workers, finished, advance)
    result.records = list(records.values())
    return result


def _run_parallel(jobs, workers: int, finished, advance) -> str | None:
    """Train ``jobs`` in ``workers`` processes, largest first (the last to finish is then a small one)."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    threads = max(1, (os.cpu_count() or 1) // workers)
    ctx = multiprocessing.get_context("spawn")
    pending = sorted(jobs, key=lambda j: -j[0].flops)
    stopped = None
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init,
                             initargs=(threads,)) as pool:
        running = {pool.submit(_train_point, c, str(run_dir)): (point, c) for point, c, run_dir in pending}
        try:
            while running:
                ready, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in ready:
                    point, c = running.pop(fut)
                    train, seconds = fut.result()
                    if train.stopped_by:
                        stopped = stopped or train.stopped_by
                        continue
                    finished(point, c, train, seconds)
                    advance(point, train)
        except BaseException:
            for fut in running:
                fut.cancel()
            raise
    return stopped


def _worker_init(threads: int) -> None:
    """A sweep worker: ``threads`` torch threads; on Linux it is sent SIGTERM (checkpoint and stop) when the
    sweep's process dies, so that a killed sweep leaves no run training behind it."""
    import signal

    import torch

    torch.set_num_threads(threads)
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _train_point(cfg: RunConfig, run_dir: str):
    from llamaherd.train.pretrain import pretrain

    t0 = time.perf_counter()
    train = pretrain(cfg, run_dir, progress=False)
    return train, time.perf_counter() - t0


class _NoBar:
    def __init__(self, console):
        self.console = console

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_task(self, *a, **k):
        return 0

    def update(self, *a, **k):
        pass


def _bar(enabled: bool, console):
    """The sweep's progress bar, advancing by FLOPs (which is what takes time), with runs done / to do."""
    if not enabled:
        return _NoBar(console)
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("runs {task.fields[runs]}"),
                    TextColumn("{task.percentage:>3.0f}% of FLOPs"), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=console)
