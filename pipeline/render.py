"""How results look: numbers as table cells, Markdown tables, and matplotlib without a display.

The sweep's report (pipeline.sweep.report) and the evaluation stage's (pipeline.eval.report) both draw
through this module; neither imports the other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def cell(value: Any) -> str:
    """A table cell: floats to 4 decimals (4 significant digits from 1 up), None as `-`."""
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1 else f"{value:.4g}"
    return "-" if value is None else str(value)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    header = "| " + " | ".join(rows[0]) + " |"
    rule = "|" + "|".join("---" for _ in rows[0]) + "|"
    body = ["| " + " | ".join(cell(v) for v in row.values()) + " |" for row in rows]
    return "\n".join([header, rule, *body])


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (files only: no display on a cluster node)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(plt: Any, fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
