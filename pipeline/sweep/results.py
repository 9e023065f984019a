"""What a sweep hands back: a summary per trial (per config of a pack), the best first."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import ExperimentConfig


class SweepError(RuntimeError):
    """The sweep ran but produced nothing usable (every trial failed, metric never reported)."""


@dataclass
class TrialSummary:
    trial_id: str
    trial_name: str
    sampled: dict[str, Any]
    status: str = "RUNNING"
    best_metric: float | None = None
    best_checkpoint: str | None = None
    last_result: dict[str, Any] = field(default_factory=dict)
    run_id: str | None = None
    started: float = field(default_factory=time.time)
    wall_s: float = 0.0
    error: str | None = None
    finished: bool = False
    pack: str | None = None    # packed: the pack's Tune trial id
    member: str | None = None  # packed: the config's name in the pack (its checkpoint subfolder)


@dataclass
class SweepResult:
    run_name: str
    trials: list[TrialSummary]
    best: TrialSummary
    wall_s: float


def sweep_result(config: ExperimentConfig, run_name: str, trials: list[TrialSummary], started: float) -> SweepResult:
    sweep = config.sweep
    scored = [t for t in trials if t.best_metric is not None and t.best_checkpoint and t.status != "ERROR"]
    if not scored:
        errors = "; ".join(f"{t.trial_name}: {(t.error or t.status).strip().splitlines()[-1]}" for t in trials)
        raise SweepError(f"no trial reported {sweep.metric!r} with a checkpoint ({errors or 'no trials ran'})")
    reverse = sweep.mode == "max"
    scored.sort(key=lambda t: t.best_metric, reverse=reverse)
    ordered = scored + [t for t in trials if t not in scored]
    return SweepResult(run_name=run_name, trials=ordered, best=scored[0], wall_s=time.time() - started)
