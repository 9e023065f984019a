"""pipeline.sweep.report: the sweep's tables and plots."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.sweep import report


def test_rank_plots_average_seeds_after_taking_each_seeds_best_lr(tmp_path: Path):
    rows = [
        {"targets": "q+v", "r": 8, "seed": 0, "lr": 1e-3, "acc": 0.80},
        {"targets": "q+v", "r": 8, "seed": 0, "lr": 3e-3, "acc": 0.84},
        {"targets": "q+v", "r": 8, "seed": 1, "lr": 1e-3, "acc": 0.82},
        {"targets": "q+v", "r": 8, "seed": 1, "lr": 3e-3, "acc": None},
        {"targets": "q+v", "r": 2, "seed": 0, "lr": 1e-3, "acc": 0.70},
    ]
    assert report._by_seed(rows, "acc", "max") == {("q+v", 8): {0: 0.84, 1: 0.82}, ("q+v", 2): {0: 0.70}}
    assert report._mean_by(rows, "acc", "max") == pytest.approx({("q+v", 8): 0.83, ("q+v", 2): 0.70})
    assert report._mean_by(rows, "acc", "min")[("q+v", 8)] == pytest.approx(0.81)
    for plot in (report.metric_vs_rank_png, report.rank_targets_heatmap_png):
        path = plot(rows, "acc", "max", tmp_path / f"{plot.__name__}.png")
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
