"""Results a person reads: the trial table (terminal + Markdown) and learning-curve plots (PNG)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline import render
from pipeline.sweep.results import TrialSummary


def trial_rows(trials: list[TrialSummary], config: Any) -> list[dict[str, Any]]:
    """One row per trial: the knobs it ran with, its best metric and wall time."""
    rows = []
    for t in trials:
        cfg = config.trial_config(t.sampled)
        rows.append({
            "trial": t.trial_name,
            "strategy": cfg.strategy.kind,
            "r": cfg.lora.r,
            "alpha": cfg.lora.effective_alpha,
            "targets": cfg.lora.targets_label,
            "variant": cfg.lora.variant_label,
            "lr": cfg.train.lr,
            "seed": cfg.train.seed,
            "trainable": t.last_result.get("trainable_params"),
            config.sweep.metric: t.best_metric,
            "steps": t.last_result.get("step"),
            "wall_s": round(t.wall_s, 1),
            "status": t.status,
        })
    if all(row["variant"] == "-" for row in rows):  # plain LoRA throughout: no column
        for row in rows:
            del row["variant"]
    return rows


def print_table(rows: list[dict[str, Any]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in rows[0]:
        table.add_column(column, justify="right" if column not in ("trial", "strategy", "targets", "status") else "left")
    for row in rows:
        table.add_row(*(render.cell(v) for v in row.values()))
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)  # logs and CI: do not squeeze the table to 80 columns
    console.print(table)


def learning_curves_png(histories: dict[str, list[tuple[int, float]]], metric: str, path: Path) -> Path:
    """Metric vs step, one line per trial."""
    plt = render.pyplot()

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, points in sorted(histories.items()):
        if points:
            steps, values = zip(*sorted(points))
            ax.plot(steps, values, marker="o", markersize=3, label=label)
    return _save_line_plot(plt, fig, ax, ("optimizer step", metric, f"{metric} per trial"), 7, path)


def _save_line_plot(plt: Any, fig: Any, ax: Any, labels: tuple[str, str, str], legend_size: int, path: Path) -> Path:
    xlabel, ylabel, title = labels
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    return render.save(plt, fig, path)


def _by_seed(rows: list[dict[str, Any]], metric: str, mode: str) -> dict[tuple[str, int], dict[int, float]]:
    """(targets, r) -> {seed: the best metric of that seed's trials in the cell (other knobs, e.g. lr)}."""
    pick = max if mode == "max" else min
    cells: dict[tuple[str, int], dict[int, float]] = {}
    for row in rows:
        value = row.get(metric)
        if value is None:
            continue
        seeds = cells.setdefault((row["targets"], int(row["r"])), {})
        seed = row.get("seed", 0)
        seeds[seed] = pick(seeds[seed], value) if seed in seeds else value
    return cells


def _mean_by(rows: list[dict[str, Any]], metric: str, mode: str) -> dict[tuple[str, int], float]:
    """(targets, r) -> the metric averaged over seeds (each seed's best over the other knobs)."""
    return {key: sum(seeds.values()) / len(seeds) for key, seeds in _by_seed(rows, metric, mode).items()}


def metric_vs_rank_png(rows: list[dict[str, Any]], metric: str, mode: str, path: Path) -> Path:
    """The LoRA paper's rank study view: metric vs r (log2 axis), one line per target set.

    With several seeds the line is their mean and each seed is a small dot.
    """
    plt = render.pyplot()
    by_seed = _by_seed(rows, metric, mode)
    seeds = {seed for values in by_seed.values() for seed in values}
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for targets in sorted({t for t, _ in by_seed}):
        points = sorted((r, values) for (t, r), values in by_seed.items() if t == targets)
        label = targets if len(seeds) == 1 else f"{targets} (mean of {len(seeds)} seeds)"
        line, = ax.plot([r for r, _ in points], [sum(v.values()) / len(v) for _, v in points], marker="o", label=label)
        if len(seeds) > 1:
            ax.scatter([r for r, v in points for _ in v], [x for _, v in points for x in v.values()],
                       s=12, color=line.get_color(), alpha=0.5)
    ax.set_xscale("log", base=2)
    ranks = sorted({r for _, r in by_seed})
    ax.set_xticks(ranks, [str(r) for r in ranks])
    return _save_line_plot(plt, fig, ax, ("LoRA rank r", metric, f"{metric} vs rank"), 8, path)


def rank_targets_heatmap_png(rows: list[dict[str, Any]], metric: str, mode: str, path: Path) -> Path:
    """rank x target set, each cell the metric averaged over seeds (blank where none reported)."""
    import numpy as np

    plt = render.pyplot()
    cells = _mean_by(rows, metric, mode)
    targets = sorted({t for t, _ in cells})
    ranks = sorted({r for _, r in cells})
    grid = np.full((len(targets), len(ranks)), np.nan)
    for (t, r), v in cells.items():
        grid[targets.index(t), ranks.index(r)] = v
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(ranks), 1.2 + 0.6 * len(targets)))
    image = ax.imshow(grid, cmap="viridis" if mode == "max" else "viridis_r", aspect="auto")
    ax.set_xticks(range(len(ranks)), [str(r) for r in ranks])
    ax.set_yticks(range(len(targets)), targets, fontsize=8)
    ax.set_xlabel("LoRA rank r")
    for i in range(len(targets)):
        for j in range(len(ranks)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.3f}", ha="center", va="center", color="w", fontsize=8)
    fig.colorbar(image, ax=ax, label=metric)
    ax.set_title(f"{metric}: rank x targets")
    # long target-set labels: let the saved image grow to fit them instead of squeezing the axes
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
