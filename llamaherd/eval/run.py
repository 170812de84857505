"""The main job's evaluation: at the end of `herd run`, the base and the final model on ``eval.tasks``.

    runs/NAME/
        eval/eval.json     {"tasks": [...], "base": {"checkpoint", "chat", "tasks": {...}}, "final": {...}}
        eval/eval.png      each task's metrics, base against final
        results.json       ... then {"stage": "eval", "checkpoint": FINAL, "metrics": {"base": ..., "final": ...}}

The base model is the pretrained checkpoint, the final one the last post-training stage's (the base again
when there is no post-training: then it is evaluated once). Both read the same prompts unless
``eval.chat_final`` puts the final model's in the chat format. A finished evaluation of the same settings is
not run again.
"""

from __future__ import annotations

import json
from pathlib import Path

from llamaherd.config import RunConfig


def _settings(cfg: RunConfig, base: Path, final: Path) -> dict:
    e = cfg.eval
    return {"tasks": list(e.tasks), "limit": e.limit, "num_fewshot": e.num_fewshot, "chat_final": e.chat_final,
            "base": str(base), "final": str(final)}


def check_eval(cfg: RunConfig) -> None:
    """A one-line error, before any work, for a bad ``eval`` setting or task."""
    from llamaherd.errors import HerdError
    from llamaherd.eval.tasks import check_task

    if not isinstance(cfg.eval.tasks, list) or not all(isinstance(t, str) for t in cfg.eval.tasks):
        raise HerdError("eval.tasks: expected a list of task names or PATH:LAYOUT strings")
    if cfg.eval.limit < 0:
        raise HerdError(f"eval.limit {cfg.eval.limit}: expected 0 (all items) or more")
    for name in cfg.eval.tasks:
        check_task(name)


def evaluate_checkpoint(path: Path, tasks: list[str], *, limit: int = 0, num_fewshot: int = -1, chat: bool = False,
                        device: str | None = None, progress=None) -> dict:
    """``{"checkpoint", "chat", "tasks": {name: metrics}}`` of one checkpoint on ``tasks``."""
    from llamaherd.eval.harness import evaluate_task
    from llamaherd.eval.loglik import scorer_for
    from llamaherd.eval.tasks import load_task

    scorer = scorer_for(str(path), device=device)
    out = {}
    for name in tasks:
        out[name] = evaluate_task(scorer, load_task(name), limit=limit or None,
                                  num_fewshot=None if num_fewshot < 0 else num_fewshot, chat=chat,
                                  progress=progress and (lambda done, total, name=name: progress(name, done, total)))
    return {"checkpoint": str(path), "chat": chat, "tasks": out}


def finished_eval(cfg: RunConfig, run_dir: Path, base: Path, final: Path) -> dict | None:
    """The stage's metrics when eval/eval.json holds an evaluation of these settings, else None."""
    try:
        done = json.loads((run_dir / "eval" / "eval.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(done, dict) or done.get("settings") != _settings(cfg, base, final):
        return None
    return {"base": done["base"], "final": done["final"]}


def stage_eval(cfg: RunConfig, run_dir: Path, base: Path, final: Path, progress: bool = True,
               console=None) -> dict:
    """Evaluate the base and the final model; write eval/eval.json and eval/eval.png; the stage's metrics
    ``{"base": ..., "final": ...}`` (``final`` is ``base``'s result when they are the same checkpoint)."""
    from llamaherd.eval.report import plot_results

    check_eval(cfg)
    out_dir = run_dir / "eval"
    settings = _settings(cfg, base, final)
    done = finished_eval(cfg, run_dir, base, final)
    if done is not None:
        return done
    bar = None
    if progress and console is not None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), console=console,
                       transient=True)
    ids: dict = {}

    def tick(label):
        def update(name, done, total):
            if bar is not None:
                key = (label, name)
                if key not in ids:
                    ids[key] = bar.add_task(f"{label}: {name}", total=total)
                bar.update(ids[key], completed=done, total=total)
        return update

    e = cfg.eval
    kw = {"limit": e.limit, "num_fewshot": e.num_fewshot, "device": cfg.train.device if cfg.train.device != "auto"
          else None}
    if bar is not None:
        bar.start()
    try:
        result = {"base": evaluate_checkpoint(base, e.tasks, progress=tick("base"), **kw)}
        if Path(final) == Path(base) and not e.chat_final:
            result["final"] = result["base"]
        else:
            result["final"] = evaluate_checkpoint(final, e.tasks, chat=e.chat_final, progress=tick("final"), **kw)
    finally:
        if bar is not None:
            bar.stop()
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_results({f"base ({Path(base).name})": result["base"], f"final ({_stage_of(run_dir, final)})": result["final"]},
                 out_dir / "eval.png")
    tmp = out_dir / "eval.json.tmp"
    tmp.write_text(json.dumps({"settings": settings, **result}, indent=2) + "\n")
    tmp.replace(out_dir / "eval.json")
    return result


def _stage_of(run_dir: Path, checkpoint: Path) -> str:
    """The post-training stage a checkpoint belongs to (its directory under the run), else its name."""
    try:
        rel = Path(checkpoint).resolve().relative_to(Path(run_dir).resolve())
    except ValueError:
        return Path(checkpoint).name
    return rel.parts[0] if rel.parts[0] != "checkpoints" else "pretrain"


def report_lines(metrics: dict) -> list[str]:
    """report.md's evaluation section: each task's headline metrics, base against final."""
    from llamaherd.eval.harness import headline

    base, final = metrics["base"], metrics["final"]
    chat = " (final model prompted in the chat format)" if final.get("chat") else ""
    lines = ["", "## Evaluation", "", f"`herd eval` on the base model (`{base['checkpoint']}`) and the final model "
             f"(`{final['checkpoint']}`){chat}; ± one standard error. `eval/eval.json` has every number.", "",
             "![base against final](eval/eval.png)", "", "| task | n | metric | base | final | change |",
             "|---|---:|---|---:|---:|---:|"]
    for name, m in base["tasks"].items():
        after = {k: (v, e) for k, v, e in headline(final["tasks"].get(name, {}))}
        for metric, value, stderr in headline(m):
            v2, e2 = after.get(metric, (None, None))
            cell = f"{value:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")
            cell2 = "-" if v2 is None else f"{v2:.4f}" + (f" ± {e2:.4f}" if e2 is not None else "")
            change = "-" if v2 is None else f"{v2 - value:+.4f}"
            lines.append(f"| {name} | {m['n']} | {metric} | {cell} | {cell2} | {change} |")
    return lines
