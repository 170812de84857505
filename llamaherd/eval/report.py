"""Results people look at: a table for the terminal, bar charts, and the main job's evaluation section.

    console.print(results_table(result, "herd eval runs/tiny"))
    plot_results({"base": base_result, "final": final_result}, "eval.png")
"""

from __future__ import annotations


def results_table(result: dict, title: str):
    """The rich table of a result: one row per task and headline metric, with its standard error."""
    from rich.table import Table

    from llamaherd.eval.harness import headline

    table = Table(title=title)
    for col in ("task", "n", "shots", "metric", "value", "± stderr"):
        table.add_column(col, justify="left" if col in ("task", "metric") else "right", no_wrap=True)
    for name, m in result["tasks"].items():
        for i, (metric, value, stderr) in enumerate(headline(m)):
            table.add_row(name if i == 0 else "", str(m["n"]) if i == 0 else "", str(m.get("num_fewshot", "-"))
                          if i == 0 else "", metric, f"{value:.4f}", "-" if stderr is None else f"{stderr:.4f}")
    return table


def plot_results(results: dict[str, dict], path) -> None:
    """Bars of each task's headline metrics (with standard errors), one colour per model: ``results`` maps a
    model's label to its ``{"tasks": ...}`` result."""
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from llamaherd.eval.harness import headline

    panels = list(dict.fromkeys((t, m) for r in results.values() for t, ms in r["tasks"].items()
                                for m, _, _ in headline(ms)))
    fig, axes = plt.subplots(1, len(panels), figsize=(2.2 * len(panels) + 1.5, 3.6), squeeze=False)
    for ax, (task, metric) in zip(axes[0], panels, strict=True):
        for i, (label, r) in enumerate(results.items()):
            got = {m: (v, e) for m, v, e in headline(r["tasks"].get(task, {}))}
            if metric in got:
                v, e = got[metric]
                ax.bar(i, v, yerr=e, color=f"C{i}", capsize=3, label=label)
                ax.text(i, v + (e or 0), f"{v:.3f}", ha="center", va="bottom", fontsize=7)
        if metric != "bits_per_byte":  # a share: the whole scale, so that small differences look small
            ax.set_ylim(0, 1)
        ax.set_title(f"{Path(task).name}\n{metric}", fontsize=8)
        ax.set_xticks([])
        ax.tick_params(labelsize=7)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(results), fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
