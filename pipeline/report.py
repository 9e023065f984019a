"""Results a person reads: the trial table (terminal + Markdown) and learning-curve plots (PNG)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.sweep import TrialSummary


def _targets(summary: TrialSummary, config: Any) -> str:
    value = summary.sampled.get("lora.target_modules", config.lora.target_modules)
    return "+".join(value) if isinstance(value, list) else str(value)


def trial_rows(trials: list[TrialSummary], config: Any) -> list[dict[str, Any]]:
    """One row per trial: the sampled knobs, its best metric and wall time."""
    rows = []
    for t in trials:
        rows.append({
            "trial": t.trial_name,
            "r": t.sampled.get("lora.r", config.lora.r),
            "targets": _targets(t, config),
            "lr": t.sampled.get("train.lr", config.train.lr),
            "trainable": t.last_result.get("trainable_params"),
            config.sweep.metric: t.best_metric,
            "steps": t.last_result.get("step"),
            "wall_s": round(t.wall_s, 1),
            "status": t.status,
        })
    return rows


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1 else f"{value:.4g}"
    return "-" if value is None else str(value)


def print_table(rows: list[dict[str, Any]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in rows[0]:
        table.add_column(column, justify="right" if column not in ("trial", "targets", "status") else "left")
    for row in rows:
        table.add_row(*(_fmt(v) for v in row.values()))
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)  # logs and CI: do not squeeze the table to 80 columns
    console.print(table)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    header = "| " + " | ".join(rows[0]) + " |"
    rule = "|" + "|".join("---" for _ in rows[0]) + "|"
    body = ["| " + " | ".join(_fmt(v) for v in row.values()) + " |" for row in rows]
    return "\n".join([header, rule, *body])


def learning_curves_png(histories: dict[str, list[tuple[int, float]]], metric: str, path: Path) -> Path:
    """Metric vs step, one line per trial."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, points in sorted(histories.items()):
        if points:
            steps, values = zip(*sorted(points))
            ax.plot(steps, values, marker="o", markersize=3, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per trial")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
