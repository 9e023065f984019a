"""What `--resume` needs besides Tune's own state: the run state file, the newest restorable sweep, and the
summaries of trials that finished before the driver was restarted."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

from pipeline import checkpoint as ckpt
from pipeline import redact, tracking
from pipeline.config import ConfigError, ExperimentConfig
from pipeline.storage import Storage
from pipeline.sweep.checkpoints import best_complete_checkpoint, trial_run_path
from pipeline.sweep.results import TrialSummary


def unique_run_name(store: Storage, name: str) -> str:
    """`name`, or `name-2`, `name-3` ... if an earlier sweep already used it (never silently reuse state)."""
    if not store.exists(store.path(name)):
        return name
    for n in itertools.count(2):
        if not store.exists(store.path(f"{name}-{n}")):
            return f"{name}-{n}"
    raise AssertionError("unreachable")



RUN_STATE = "loraforge_run.json"


def write_run_state(store: Storage, run_dir: str, experiment_id: str, parent_run_id: str, config: ExperimentConfig) -> None:
    """What `--resume` needs besides Tune's own state: the MLflow ids and the config the sweep ran with.

    The storage is shared (a team folder, a bucket), so the config is stored with its secrets masked;
    `--resume` takes them from the config given then (`redact.restore`).
    """
    store.mkdirs(run_dir)
    store.write_text(f"{run_dir}/{RUN_STATE}", json.dumps({
        "experiment_id": experiment_id, "parent_run_id": parent_run_id,
        "config": redact.redact(config.model_dump(mode="json")),
    }, indent=1))


def read_run_state(config: ExperimentConfig, run_dir: str) -> dict[str, Any]:
    """The run state of `run_dir`; ConfigError naming the file when it is cut short or not ours."""
    store = Storage.of(config.ray.storage_path)
    path = f"{run_dir}/{RUN_STATE}"
    try:
        state = json.loads(store.read_text(path))
        if not isinstance(state, dict) or not {"experiment_id", "parent_run_id", "config"} <= state.keys():
            raise ValueError("it lacks experiment_id, parent_run_id or config")
    except (ValueError, UnicodeDecodeError) as err:
        raise ConfigError([f"--resume: {store.describe(path)} is unreadable ({err.__class__.__name__}: {err}); it was cut "
                           "short or edited, so this sweep cannot be resumed: run without --resume to start afresh "
                           "(its checkpoints stay where they are)"]) from None
    return state


def find_resumable(config: ExperimentConfig) -> str:
    """The newest sweep directory of this experiment that Tune can restore (a path on the sweep's
    storage); ConfigError if none."""
    import re

    from ray import tune

    store = Storage.of(config.ray.storage_path)
    pattern = re.compile(re.escape(config.name) + r"(-\d+)?")
    runs = [d for d in store.dirs(store.root, f"{config.name}*")
            if pattern.fullmatch(Path(d).name) and store.is_file(f"{d}/{RUN_STATE}")]
    runs = [d for d in sorted(runs, key=lambda d: store.mtime(f"{d}/{RUN_STATE}"), reverse=True)
            if tune.Tuner.can_restore(d, storage_filesystem=store.fs if store.remote else None)]
    if not runs:
        raise ConfigError([f"--resume: no interrupted sweep named {config.name!r} under ray.storage_path={store.written}; "
                           "run without --resume to start one"])
    return runs[0]


def summary_from_tracking(config: ExperimentConfig, experiment_id: str, parent_run_id: str, trial_id: str,
                           sampled: dict[str, Any], store: Storage, train_storage_path: str,
                           pack: str | None = None, member: str | None = None) -> TrialSummary:
    """A trial (or a packed config) that finished before the driver was restarted: rebuilt from MLflow
    and checkpoint storage."""
    mlflow_client = tracking.client(config.tracking.tracking_uri)
    summary = TrialSummary(trial_id, f"trial_{trial_id}", sampled, finished=True, pack=pack, member=member)
    summary.run_id = tracking.find_trial_run(mlflow_client, experiment_id, parent_run_id, trial_id)
    if summary.run_id is not None:
        run = mlflow_client.get_run(summary.run_id)
        summary.status = run.data.tags.get("loraforge.trial_status", "DONE")
        summary.wall_s = run.data.metrics.get("best_wall_time_s", 0.0)
        summary.last_result = {"trainable_params": run.data.params.get("trainable_params")}
    best = best_complete_checkpoint(store, trial_run_path(store, train_storage_path, pack or trial_id),
                                    config.sweep.metric, config.sweep.mode, member)
    if best is not None and summary.status != "ERROR":
        summary.best_checkpoint, summary.best_metric = best
        summary.last_result["step"] = ckpt.step_of(store.local(best[0]))
    return summary
