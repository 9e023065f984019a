"""The driver's Tune callback: each trial's best checkpoint, and its MLflow run closed with the adapter attached."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback

from pipeline import interrupts, redact, tracking, warmpool
from pipeline.config import ExperimentConfig
from pipeline.pack_train import member_trial_id
from pipeline.storage import Storage
from pipeline.sweep.checkpoints import best_complete_checkpoint, complete, trained_epochs, trial_run_path
from pipeline.sweep.results import TrialSummary
from pipeline.sweep.space import dotted_path, pack_members


# a packed config's state in the pack -> its trial status; LIVE ones take the pack trial's end instead
_PACK_STATUS = {"DONE": "DONE", "STOPPED": "STOPPED", "ERROR": "ERROR"}
_MLFLOW_STATUS = {"DONE": "FINISHED", "STOPPED": "FINISHED", "BUDGET": "KILLED", "ERROR": "FAILED",
                  "INTERRUPTED": "KILLED"}


def killed_status() -> str:
    """A trial Tune ended unfinished: Ctrl-C / SIGTERM (resumable), else the time budget."""
    return "INTERRUPTED" if interrupts.received() is not None else "BUDGET"


def _restored_callback() -> Any:
    """What a pickled TrialRunCallback comes back as: a no-op until run_sweep puts the live one in its place."""
    return Callback()


class TrialRunCallback(Callback):
    """Driver side: track each trial's best checkpoint; close its MLflow run with the adapter attached.

    A packed trial is k configs: each gets its own summary (and run), keyed by its own trial id. Given
    its dependencies (the config, where the MLflow runs and the checkpoints are) when the sweep starts."""

    def __init__(self, config: ExperimentConfig, experiment_id: str, parent_run_id: str, store: Storage,
                 train_storage_path: str, lineage: dict[str, Any] | None = None) -> None:
        self.config, self.experiment_id, self.parent_run_id, self.lineage = config, experiment_id, parent_run_id, lineage
        self.store, self.train_storage_path = store, train_storage_path
        self.metric, self.mode = config.sweep.metric, config.sweep.mode
        self.trials: dict[str, TrialSummary] = {}

    def __reduce__(self) -> tuple:
        # Tune pickles its run config, callbacks included, into tuner.pkl on ray.storage_path (a shared
        # folder or bucket); this callback holds the config, secrets and all. A restore puts a fresh
        # callback in its place (run_sweep), so the pickle keeps a placeholder
        return (_restored_callback, ())

    def _summary(self, trial: Any) -> TrialSummary:
        sampled = {dotted_path(k): v for k, v in trial.config.items()}
        summary = self.trials.setdefault(trial.trial_id, TrialSummary(trial.trial_id, str(trial), sampled))
        if sampled != summary.sampled:
            # PBT restarted the trial from a copy of a better trial's checkpoint, with that trial's
            # config and a new lr: its best so far belonged to the config it left behind
            summary.sampled, summary.best_metric, summary.best_checkpoint = sampled, None, None
        return summary

    def _summaries(self, trial: Any) -> list[TrialSummary]:
        """The trial's config summaries: one, or one per config of a pack."""
        members = pack_members(trial.config)
        if members is None:
            return [self._summary(trial)]
        out = []
        for name, sampled in members:
            trial_id = member_trial_id(trial.trial_id, name)
            out.append(self.trials.setdefault(trial_id, TrialSummary(
                trial_id, f"trial_{trial_id}", sampled, pack=trial.trial_id, member=name)))
        return out

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if (pool := warmpool.current()) is not None:
            pool.prepare(1)  # the processes of the trial that will follow this one in its slot
        self._summaries(trial)

    def _better(self, summary: TrialSummary, value: Any) -> bool:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return False
        # ties go to the later checkpoint, as Ray Train's score-ordered CheckpointConfig keeps it
        return summary.best_metric is None or (value >= summary.best_metric if self.mode == "max" else value <= summary.best_metric)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if "pack" not in result:
            summary = self._summary(trial)
            summary.last_result = dict(result)
            if self._better(summary, value := result.get(self.metric)):
                summary.best_metric = float(value)
                summary.best_checkpoint = result.get("checkpoint_path") or summary.best_checkpoint
            return
        shared = {k: v for k, v in result.items() if k not in ("pack", self.metric)}
        for summary in self._summaries(trial):
            entry = result["pack"][summary.member]
            evaluated = self.metric in entry
            if evaluated or not summary.last_result:
                # a config stopped before this driver started (a resumed sweep) last trained at its stop
                summary.last_result = {**shared, **entry, "step": entry.get("stopped_step") if not evaluated
                                       and entry.get("stopped_step") is not None else shared.get("step")}
            else:
                summary.last_result.update({k: entry[k] for k in ("status", "stopped_step", "rung", "error")})
            if evaluated and self._better(summary, value := entry[self.metric]) and result.get("checkpoint_path"):
                summary.best_metric = float(value)
                summary.best_checkpoint = f"{result['checkpoint_path']}/{summary.member}"
            if entry["status"] in _PACK_STATUS and not summary.finished:
                # halved out, trained to the end, or stopped on a non-finite loss: closed now, not at the pack's end
                self._close(summary, _PACK_STATUS[entry["status"]], entry.get("error"))

    def _close(self, summary: TrialSummary, status: str, error: str | None = None) -> None:
        """Close one config's MLflow run with its status; any config with a checkpoint gets its best adapter."""
        summary.finished = True
        summary.wall_s = time.time() - summary.started
        summary.error, summary.status = error, status
        mlflow_client = tracking.client(self.config.tracking.tracking_uri)
        trial_id = summary.pack or summary.trial_id
        run_dir = trial_run_path(self.store, self.train_storage_path, trial_id)
        # normally the trial's rank-0 worker created the run (and reported its id); a trial that failed
        # before that gets one here
        summary.run_id = summary.last_result.get("mlflow_run_id") or tracking.trial_run(
            mlflow_client, self.experiment_id, self.parent_run_id, summary.trial_id, summary.trial_name,
            self.config.trial_config(summary.sampled), summary.sampled, self.lineage)
        mlflow_client.set_tag(summary.run_id, "loraforge.trial_status", status)
        if status == "STOPPED" and summary.last_result.get("rung") is not None:
            mlflow_client.set_tag(summary.run_id, "loraforge.stopped_at_rung", str(summary.last_result["rung"] + 1))
        if error:
            mlflow_client.set_tag(summary.run_id, "loraforge.error", redact.redact_text(error)[-5000:])
        if summary.member and summary.best_checkpoint is None and status != "ERROR":
            # a packed config that stopped before the driver was restarted: its best is on storage
            if best_found := best_complete_checkpoint(self.store, run_dir, self.metric, self.mode, summary.member):
                summary.best_checkpoint, summary.best_metric = best_found
        # an interrupted trial is not over: `--resume` continues it and attaches its adapter then
        attach = bool(summary.best_checkpoint) and status not in ("ERROR", "INTERRUPTED")
        if attach and not complete(self.store.local(summary.best_checkpoint)):
            # a trial killed mid-upload (time budget, ASHA) can leave its newest checkpoint
            # half-copied or corrupt: fall back to the best verified one on storage, never to nothing
            fallback = best_complete_checkpoint(self.store, run_dir, self.metric, self.mode, summary.member)
            mlflow_client.set_tag(summary.run_id, "loraforge.ckpt_fallback", str(fallback))
            summary.best_checkpoint, summary.best_metric = fallback if fallback else (None, None)
            attach = fallback is not None
        best = {self.metric: summary.best_metric} if summary.best_metric is not None else {}
        best["wall_time_s"] = summary.wall_s
        # on an object store: the checkpoint downloaded once (pipeline.storage)
        adapter = self.store.local(summary.best_checkpoint) if attach else None
        tracking.finish_trial_run(mlflow_client, summary.run_id, _MLFLOW_STATUS[status], adapter, best)

    def _finish(self, trial: Any, status: str, error: str | None = None) -> None:
        """The Tune trial ended (FINISHED, FAILED, or KILLED by the time budget): close its configs' runs."""
        if pack_members(trial.config) is not None:
            for summary in self._summaries(trial):
                if not summary.finished:
                    state = summary.last_result.get("status")
                    final = _PACK_STATUS.get(state) or {"FAILED": "ERROR", "KILLED": killed_status()}.get(status, "DONE")
                    self._close(summary, final, error or summary.last_result.get("error"))
            return
        summary = self._summary(trial)
        if summary.finished:
            return
        # finished = trained all its epochs (a trial resumed after a driver restart reports fewer times)
        epochs = self.config.trial_config(summary.sampled).train.epochs
        run_dir = trial_run_path(self.store, self.train_storage_path, trial.trial_id)
        if "epoch" not in summary.last_result and status != "FAILED":
            # a trial restored at its very end (the driver died before Tune saved it as finished)
            # reruns no step and reports nothing: its checkpoints on storage say how far it got
            summary.last_result["epoch"] = trained_epochs(self.store, run_dir)
            if summary.best_checkpoint is None and (best := best_complete_checkpoint(self.store, run_dir, self.metric, self.mode)):
                summary.best_checkpoint, summary.best_metric = best
        trained_all = summary.last_result.get("epoch", 0) >= epochs - 1e-9
        match status:
            case "FAILED":
                final = "ERROR"
            case "KILLED":
                final = killed_status()  # cut off by sweep.time_budget_s, or by a signal
            case _:
                final = "DONE" if trained_all else "STOPPED"
        self._close(summary, final, error)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trial, "FINISHED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        error = None
        if getattr(trial, "error_file", None) and Path(trial.error_file).is_file():
            error = Path(trial.error_file).read_text(errors="replace")[-5000:]
        self._finish(trial, "FAILED", error)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        # the time budget ends the experiment without completing running trials
        for trial in trials:
            members = pack_members(trial.config)
            ids = [trial.trial_id] if members is None else [member_trial_id(trial.trial_id, n) for n, _ in members]
            if any(i in self.trials and not self.trials[i].finished for i in ids):
                self._finish(trial, "KILLED")
