"""The whole pipeline in order: validate -> Ray -> sweep -> register -> evaluate -> report.

`run_pipeline` is what `loraforge run` and `jobs/sweep.py` call. Everything that
can be checked is checked before Ray starts a worker; once the MLflow parent run
exists, any failure marks it FAILED before the error propagates.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import (atomic, cluster, data, evaluate, interrupts, outbox, preflight, redact, render, sweep, tracking,
                      warmpool)
from pipeline.sweep import planner, report
from pipeline.config import ConfigError, ExperimentConfig, RaySpec
from pipeline.eval import catalog, stage
from pipeline.registry import lineage, mlflow_model

log = logging.getLogger("loraforge")

@dataclass
class PipelineResult:
    sweep: sweep.SweepResult
    parent_run_id: str
    model_name: str
    model_version: str
    model_uri: str
    eval_metrics: dict[str, float]
    rows: list[dict[str, Any]]
    evaluation: Any = None  # pipeline.eval.stage.StageResult when benchmark suites ran


def outbox_dir(config: ExperimentConfig) -> Path:
    """Where trials queue MLflow writes while the server is unreachable (pipeline.outbox): tracking.outbox_dir,
    else beside the checkpoints. The outbox is plain files, so with checkpoints on an object store the default
    is a local folder; a multi-node cluster then needs tracking.outbox_dir on storage every node mounts."""
    if config.tracking.outbox_dir is not None:
        return config.tracking.outbox_dir
    if isinstance(config.ray.storage_path, Path):
        return config.ray.storage_path / "mlflow_outbox"
    return Path(RaySpec.model_fields["storage_path"].default, "mlflow_outbox").resolve()  # the default folder


def placed_here(stored: dict[str, Any], given: ExperimentConfig) -> dict[str, Any]:
    """The stored config with where-it-runs taken from `given`: the cluster to join and the input files' paths.

    A sweep resumed on another cluster (its head lost, F7) must not dial the old head's address, and a
    submitted job's inputs lie in that job's own working dir.
    """
    placed = json.loads(json.dumps(stored))
    for key in ("address", "num_cpus", "warm_workers"):
        placed["ray"][key] = getattr(given.ray, key)
    for key, path in preflight.input_paths(given).items():
        *parents, last = key.split(".")
        node: Any = placed
        for part in parents:
            node = node[int(part)] if isinstance(node, list) and int(part) < len(node) else (
                node.get(part) if isinstance(node, dict) else None)
            if node is None:
                break
        if isinstance(node, dict):
            node[last] = str(path)
    return placed


def run_pipeline(config: ExperimentConfig, *, reports_dir: Path | None = None, resume: bool = False) -> PipelineResult:
    """Run sweep -> train -> track -> register -> evaluate for `config`; raises ConfigError before any work.

    `resume=True` continues the newest interrupted sweep of `config.name` (Tune restore:
    finished trials kept, the others continued from their checkpoints) under its MLflow parent run.
    SIGINT or SIGTERM raise `interrupts.Interrupted` after the parent and running trials are marked
    KILLED; nothing is registered or evaluated (pipeline.interrupts).
    """
    with interrupts.catching():
        return _run_pipeline(config, reports_dir=reports_dir, resume=resume)


def _run_pipeline(config: ExperimentConfig, *, reports_dir: Path | None, resume: bool) -> PipelineResult:
    cluster.set_env_defaults()
    resume_dir, parent_run_id = None, None
    if resume:
        resume_dir = sweep.find_resumable(config)
        state = sweep.read_run_state(config, resume_dir)
        given = config.model_dump(mode="json")
        # the stored config's secrets are masked: the config given now supplies them; so does where
        # this run is (the cluster, the input files' paths), which a sweep resumed elsewhere changes
        stored = ExperimentConfig.model_validate(placed_here(redact.restore(state["config"], given), config))
        if stored.model_dump(mode="json") != given:
            log.warning("--resume: continuing %s with the config it started with, not the one given now", resume_dir)
        config, parent_run_id = stored, state["parent_run_id"]
        log.info("resuming sweep %s (MLflow parent run %s)", resume_dir, parent_run_id)

    trial_configs = sweep.candidate_configs(config)
    data_summary = preflight.check(config, trial_configs)
    experiment_id = tracking.preflight(config.tracking.tracking_uri, config.tracking.experiment_name,
                                       config.tracking.registered_model_name)
    if config.tracking.tracking_uri.startswith(("http://", "https://")):
        # set before Ray starts: every trial worker inherits it (pipeline.outbox)
        os.environ[outbox.ENV_VAR] = str(outbox_dir(config))
    started_local = cluster.connect_ray(config)
    interrupts.reclaim()
    resources = sweep.cluster_resources()
    concurrency = sweep.plan_concurrency(trial_configs, resources, config.sweep.max_concurrent_trials)
    packing = planner.plan(config, resources)
    trial_count = config.sweep.trial_count()
    if config.sweep.scheduler == "pbt" and trial_count > concurrency:
        # PBT compares trials at the same time; Tune would time-slice a bigger population by pausing trials
        raise ConfigError([f"sweep.scheduler: pbt trains its whole population at once, but the sweep has "
                           f"{trial_count} trials and only {concurrency} fit at a time; shrink the grid or "
                           "num_samples to at most that"])
    if packing is None:
        log.info("sweep %s: %d trials, %d at a time, %d training rows", config.name, trial_count, concurrency,
                 data_summary.train_rows)
        log.info("workload: %s", sweep.workload(trial_configs, data_summary.train_rows, trial_count, concurrency,
                                                config.sweep.time_budget_s))
        workers, tune_trials = max(c.train.num_workers for c in trial_configs), trial_count
    else:
        concurrency = packing.concurrency
        halving = (f"successive halving inside each pack (grace_period {config.sweep.asha.grace_period}, "
                   f"reduction_factor {config.sweep.asha.reduction_factor})" if config.sweep.scheduler == "asha"
                   else "every config to the end")
        log.info("sweep %s: %d configs in %d packs (sizes %s), %d pack(s) at a time, %d CPU(s) each; %s; "
                 "%d training rows", config.name, trial_count, len(packing.packs),
                 ", ".join(str(len(p)) for p in packing.packs), concurrency, packing.cpus_per_pack, halving,
                 data_summary.train_rows)
        for line in packing.estimate_lines:
            log.info("memory planner: %s", line)
        workers, tune_trials = 1, len(packing.packs)
    warmpool.deactivate()
    if started_local and config.ray.warm_workers:
        # the processes the packs (or trials) need, no more
        warmpool.activate(workers, tune_trials, concurrency)

    mlflow_client = tracking.client(config.tracking.tracking_uri)
    lineage = run_lineage(config, data_summary)
    if parent_run_id is None:
        parent_run_id = tracking.start_parent_run(mlflow_client, experiment_id, config, trial_count, lineage)
    else:
        mlflow_client.update_run(parent_run_id, status="RUNNING")
    try:
        result = _run_stages(config, mlflow_client, experiment_id, parent_run_id, data_summary, concurrency,
                             reports_dir, resume_dir, lineage, packing)
    except interrupts.Interrupted as err:
        mlflow_client.set_tag(parent_run_id, "loraforge.interrupted_by", signal_name(err.signum))
        mlflow_client.set_terminated(parent_run_id, status="KILLED")
        raise
    except BaseException:
        mlflow_client.set_terminated(parent_run_id, status="FAILED")
        raise
    finally:
        warmpool.deactivate()  # stop starting processes; idle ones go when Ray does
    mlflow_client.set_terminated(parent_run_id, status="FINISHED")
    _, left, where = outbox.drain_at_end(config.tracking.tracking_uri, config.tracking.outbox_wait_s)
    if left:
        log.warning("%d MLflow writes are still unsent in %s (the server is unreachable); send them with: "
                    "loraforge mlflow sync %s --tracking-uri %s", left, where, where, config.tracking.tracking_uri)
    return result


def signal_name(signum: int) -> str:
    import signal

    return signal.Signals(signum).name


def _run_stages(config: ExperimentConfig, mlflow_client: Any, experiment_id: str, parent_run_id: str,
                data_summary: preflight.DataSummary, concurrency: int, reports_dir: Path | None,
                resume_dir: str | None, lineage: dict[str, Any], packing: Any = None) -> PipelineResult:
    sweep_result = sweep.run_sweep(
        config, experiment_id=experiment_id, parent_run_id=parent_run_id,
        num_train_examples=data_summary.train_rows, concurrency=concurrency, resume_dir=resume_dir, lineage=lineage,
        packing=packing,
    )
    _drain_outbox(config)
    best = sweep_result.best
    metric = config.sweep.metric
    model_name, alias = config.tracking.registered_model_name, config.tracking.alias
    try:
        version = register_winner(config, mlflow_client, parent_run_id, best, lineage)
    except Exception as err:  # an artifact upload or the registry refused: the sweep's work is all kept
        raise sweep.SweepError(
            f"registering the winner ({best.trial_name}, {metric} {best.best_metric:.4f}) failed: "
            f"{redact.redact_text(f'{type(err).__name__}: {err}')[:600]}. Nothing was registered or aliased; the "
            f"trials' MLflow runs and checkpoints ({config.ray.storage_path}) are kept. Once the cause is fixed, "
            f"register it with: loraforge run CONFIG --resume (this config)") from err
    model_uri = f"models:/{model_name}@{alias}"

    # evaluate what the registry serves, not what is in memory
    evaluation = evaluate.evaluate_registered_remote(config, model_name, alias)
    eval_metrics = evaluation["metrics"]
    from mlflow.entities import Metric

    mlflow_client.log_batch(parent_run_id, metrics=[
        Metric(f"registered_{k}", float(v), 0, 0) for k, v in eval_metrics.items()
    ])
    for key, value in eval_metrics.items():
        mlflow_client.set_model_version_tag(model_name, version.version, f"eval.{key.removeprefix('eval_')}", f"{value:.6f}")
    mlflow_client.set_tag(parent_run_id, "loraforge.registered_model_uri", f"models:/{model_name}/{version.version}")

    rows = report.trial_rows(sweep_result.trials, config)
    report.print_table(rows, title=f"{config.name}: {len(rows)} trials ({config.sweep.scheduler}, {sweep_result.wall_s:.0f} s)")
    _write_report(config, mlflow_client, parent_run_id, sweep_result, rows, eval_metrics, model_uri, version.version, reports_dir)
    evaluation = _benchmark_stage(config, sweep_result, model_name, str(version.version), reports_dir)
    if evaluation is not None:
        mlflow_client.set_tag(parent_run_id, "loraforge.eval_run_id", evaluation.run_id)
    return PipelineResult(sweep_result, parent_run_id, model_name, str(version.version), model_uri, eval_metrics, rows,
                          evaluation)


def _drain_outbox(config: ExperimentConfig) -> None:
    """Before registering: every trial's queued MLflow writes (its adapter among them) must be on the server."""
    sent, left, where = outbox.drain_at_end(config.tracking.tracking_uri, config.tracking.outbox_wait_s)
    if sent:
        log.info("outbox: sent %d MLflow writes queued while the server was unreachable", sent)
    if left:
        raise sweep.SweepError(
            f"the MLflow server {config.tracking.tracking_uri} stayed unreachable for tracking.outbox_wait_s="
            f"{config.tracking.outbox_wait_s:g} s after the sweep; {left} writes are kept in {where}. The trials' "
            f"checkpoints are under {config.ray.storage_path}. When the server is back: loraforge mlflow sync {where} "
            f"--tracking-uri {config.tracking.tracking_uri}, then register with loraforge run {config.name} --resume")


def run_lineage(config: ExperimentConfig, data_summary: preflight.DataSummary) -> dict[str, Any]:
    """Tags and dataset inputs every run of this sweep records (computed once, here in the driver)."""
    base = lineage.base_identity(config.model.name_or_path)
    return {"base": base, "tags": lineage.run_tags(base),
            "datasets": lineage.datasets(config, data_summary.train_rows, data_summary.eval_rows)}


def register_winner(config: ExperimentConfig, mlflow_client: Any, parent_run_id: str, best: sweep.TrialSummary,
                    records: dict[str, Any]) -> Any:
    """Log the winning trial's adapter as an MLflow Model on its run and register it with its lineage."""
    trial_config = config.trial_config(best.sampled)
    base = records["base"]
    uri = config.tracking.tracking_uri
    with tempfile.TemporaryDirectory(prefix="loraforge-register-") as tmp:
        adapter = tracking.fetch_adapter(f"runs:/{best.run_id}/{tracking.ADAPTER_ARTIFACT}", uri, Path(tmp))
        info = mlflow_model.log_model(trial_config, best.run_id, adapter, base,
                                      data.load_split(config.data, "eval", config.train.seed)[:2], uri)
    tags = lineage.version_tags(trial_config, base, records["datasets"], sweep_run_id=parent_run_id, trial_id=best.trial_id,
                                trial_run_id=best.run_id)
    tags.update({"loraforge.trial": best.trial_name, config.sweep.metric: f"{best.best_metric:.6f}"})
    return mlflow_model.register(mlflow_client, config.tracking.registered_model_name, info, best.run_id,
                                 config.tracking.alias, tags,
                                 mlflow_model.describe(trial_config, base, config.sweep.metric, best.best_metric))


def _benchmark_stage(config: ExperimentConfig, sweep_result: sweep.SweepResult, model_name: str, version: str,
                     reports_dir: Path | None) -> Any:
    """The configured benchmark suites on the registered version (and, with eval.all_trials, every trial)."""
    names = catalog.suite_names(config)
    if not config.eval.enabled or not names:
        return None
    # the winner's adapter is the registered one: it gets the candidate's scores instead of a second pass
    trials = [stage.EvalModel(f"trial:{t.trial_name}", f"runs:/{t.run_id}/{tracking.ADAPTER_ARTIFACT}",
                              params=dict(t.sampled),
                              same_as="candidate" if t.run_id == sweep_result.best.run_id else None)
              for t in sweep_result.trials if config.eval.all_trials and t.run_id and t.best_checkpoint]
    return stage.run_stage(config, model_ref=f"models:/{model_name}/{version}", reports_dir=reports_dir,
                           trials=trials, names=names)


def _write_report(config: ExperimentConfig, mlflow_client: Any, parent_run_id: str, sweep_result: sweep.SweepResult,
                  rows: list[dict[str, Any]], eval_metrics: dict[str, float], model_uri: str, version: str,
                  reports_dir: Path | None) -> None:
    metric = config.sweep.metric
    histories = {}
    # rows were built from these trials, in this order
    for trial, row in zip(sweep_result.trials, rows):
        if trial.run_id:
            history = mlflow_client.get_metric_history(trial.run_id, metric)
            histories[f"{trial.trial_name} r={row['r']} {row['targets']}"] = [(m.step, m.value) for m in history]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        report.learning_curves_png(histories, metric, out / "learning_curves.png")
        pictures = ["![learning curves](learning_curves.png)"]
        if len({(row["r"], row["targets"]) for row in rows}) > 1:
            report.metric_vs_rank_png(rows, metric, config.sweep.mode, out / "metric_vs_rank.png")
            report.rank_targets_heatmap_png(rows, metric, config.sweep.mode, out / "rank_targets_heatmap.png")
            pictures += ["![metric vs rank](metric_vs_rank.png)", "![rank x targets](rank_targets_heatmap.png)"]
        lines = [
            f"# {config.name}",
            "",
            f"Winner: {sweep_result.best.trial_name}, registered as `{model_uri}` (version {version}).",
            "",
            "Registered adapter, loaded back from the registry, on the full eval set:",
            "",
            *(f"- {k}: {v:g}" if k.endswith(("examples", "tokens")) else f"- {k}: {v:.4f}" for k, v in eval_metrics.items()),
            "",
            "## Trials",
            "",
            render.markdown_table(rows),
            "",
            *pictures,
        ]
        (out / "report.md").write_text("\n".join(lines) + "\n")
        mlflow_client.log_artifacts(parent_run_id, str(out), "report")
        if reports_dir is not None:
            reports_dir.mkdir(parents=True, exist_ok=True)
            for item in out.iterdir():
                atomic.write_bytes(reports_dir / item.name, item.read_bytes())
