"""MLflow: the one module that talks to the tracking server and the Model Registry.

Layout of a sweep in MLflow: one parent run (the sweep) with params from the
validated config; one nested run per trial (tag `mlflow.parentRunId`) with the
trial's own params, per-step loss/lr from the rank-0 worker and eval metrics; the
winner's adapter folder registered as a model version and given an alias.
Clients are created where they are used (driver, trial actor, rank-0 worker),
never at import: Ray actors are separate processes.
"""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, ExperimentConfig

PARENT_TAG = "mlflow.parentRunId"
TRIAL_TAG = "loraforge.trial_id"
RUN_NAME_TAG = "mlflow.runName"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "loraforge.json")
ADAPTER_ARTIFACT = "adapter"


def client(tracking_uri: str) -> Any:
    from mlflow import MlflowClient

    # the registry URI is given explicitly: left out, MLflow falls back to a process-global
    # one that any other code in the process may have set
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def artifact_location(tracking_uri: str) -> str | None:
    """Artifacts next to a SQLite store (absolute), so every process writes to the same place."""
    if tracking_uri.startswith("sqlite:///"):
        db_path = Path(tracking_uri[len("sqlite:///"):])
        return (db_path.parent / "mlartifacts").resolve().as_uri()
    return None


def preflight(tracking_uri: str, experiment_name: str) -> str:
    """Reach the store, get or create the experiment, return its id; ConfigError if unusable.

    HTTP servers are probed with one short request first: MLflow's own client
    retries for minutes before it gives up.
    """
    if tracking_uri.startswith(("http://", "https://")):
        probe = tracking_uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(probe, timeout=5) as response:  # noqa: S310 (user-given URI)
                response.read(16)
        except urllib.error.HTTPError as err:
            if err.code in (401, 403):
                raise ConfigError([
                    f"tracking.tracking_uri: {tracking_uri} answered {err.code}; set MLFLOW_TRACKING_USERNAME/"
                    "MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN"
                ]) from None
        except (urllib.error.URLError, OSError) as err:
            raise ConfigError([
                f"tracking.tracking_uri: MLflow tracking URI unreachable: {tracking_uri} ({getattr(err, 'reason', err)}); "
                "start the server or fix the URI (MLFLOW_TRACKING_URI overrides the config)"
            ]) from None
    elif tracking_uri.startswith("sqlite:///"):
        db_dir = Path(tracking_uri[len("sqlite:///"):]).parent
        if not db_dir.is_dir():
            raise ConfigError([f"tracking.tracking_uri: folder {str(db_dir)!r} for the SQLite store does not exist"])
        if not os.access(db_dir, os.W_OK):
            raise ConfigError([f"tracking.tracking_uri: folder {str(db_dir)!r} is not writable"])
    try:
        return ensure_experiment(client(tracking_uri), experiment_name, tracking_uri)
    except ConfigError:
        raise
    except Exception as err:  # any store error means nothing can be tracked: stop before training
        raise ConfigError([f"tracking.tracking_uri: cannot use MLflow store {tracking_uri}: {err}"]) from None


def ensure_experiment(mlflow_client: Any, name: str, tracking_uri: str) -> str:
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is None:
        return mlflow_client.create_experiment(name, artifact_location=artifact_location(tracking_uri))
    if experiment.lifecycle_stage == "deleted":
        raise ConfigError([
            f"tracking.experiment_name: experiment {name!r} is deleted; restore it "
            f"(mlflow experiments restore --experiment-id {experiment.experiment_id}) or pick another name"
        ])
    return experiment.experiment_id


def flat_params(config: ExperimentConfig) -> dict[str, str]:
    """The validated config flattened to `section.key` params (lists joined with '+')."""
    flat: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}.{key}" if prefix else key)
        elif isinstance(node, list):
            flat[prefix] = "+".join(str(v) for v in node) if all(not isinstance(v, (dict, list)) for v in node) else str(node)
        else:
            flat[prefix] = str(node)[:6000]

    walk(config.model_dump(mode="json", exclude={"sweep"}), "")
    return flat


def log_params(mlflow_client: Any, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(key, str(value)) for key, value in params.items()]
    for start in range(0, len(items), 100):  # MLflow's batch limit is 100 params
        mlflow_client.log_batch(run_id, params=items[start : start + 100])


def start_parent_run(mlflow_client: Any, experiment_id: str, config: ExperimentConfig, trial_count: int) -> str:
    run = mlflow_client.create_run(
        experiment_id,
        run_name=config.name,
        tags={"loraforge.kind": "sweep", "loraforge.searcher": config.sweep.searcher},
    )
    params = flat_params(config)
    params.update({
        "sweep.searcher": config.sweep.searcher,
        "sweep.scheduler": config.sweep.scheduler,
        "sweep.metric": config.sweep.metric,
        "sweep.mode": config.sweep.mode,
        "sweep.trials": trial_count,
        "sweep.space": "; ".join(f"{k}={v.model_dump(exclude_none=True)}" for k, v in config.sweep.parameters.items()),
    })
    log_params(mlflow_client, run.info.run_id, params)
    return run.info.run_id


def start_trial_run(
    mlflow_client: Any,
    experiment_id: str,
    parent_run_id: str,
    trial_id: str,
    trial_name: str,
    config: ExperimentConfig,
    sampled: dict[str, Any],
) -> str:
    """A nested run for one trial; params are the trial's full config plus what the sweep sampled."""
    run = mlflow_client.create_run(
        experiment_id,
        run_name=trial_name,
        tags={PARENT_TAG: parent_run_id, TRIAL_TAG: trial_id, "loraforge.kind": "trial"},
    )
    params = flat_params(config)
    params.update({f"sampled.{k}": "+".join(map(str, v)) if isinstance(v, list) else v for k, v in sampled.items()})
    log_params(mlflow_client, run.info.run_id, params)
    return run.info.run_id


class MetricBuffer:
    """Collects per-step metrics and sends them in batches (one store write per flush)."""

    def __init__(self, mlflow_client: Any, run_id: str, flush_every: int = 50):
        self.client = mlflow_client
        self.run_id = run_id
        self.flush_every = flush_every
        self.pending: list[Any] = []

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending.extend(Metric(key, float(value), now, step) for key, value in metrics.items())
        if len(self.pending) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        for start in range(0, len(self.pending), 1000):
            self.client.log_batch(self.run_id, metrics=self.pending[start : start + 1000])
        self.pending = []


def find_trial_run(mlflow_client: Any, experiment_id: str, parent_run_id: str, trial_id: str) -> str | None:
    runs = mlflow_client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}' and tags.`{TRIAL_TAG}` = '{trial_id}'",
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def trial_run(mlflow_client: Any, experiment_id: str, parent_run_id: str, trial_id: str, trial_name: str,
              config: ExperimentConfig, sampled: dict[str, Any]) -> str:
    """The trial's nested run, created on first use: a restarted worker group, a PBT generation
    and a `--resume`d sweep find the run the trial started in."""
    if (run_id := find_trial_run(mlflow_client, experiment_id, parent_run_id, trial_id)) is not None:
        return run_id
    return start_trial_run(mlflow_client, experiment_id, parent_run_id, trial_id, trial_name, config, sampled)


def finish_trial_run(mlflow_client: Any, run_id: str, status: str, adapter_dir: Path | None, summary: dict[str, float]) -> None:
    """Log the trial's best adapter and summary metrics, then close the run with `status`."""
    if summary:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        mlflow_client.log_batch(run_id, metrics=[Metric(f"best_{k}", float(v), now, 0) for k, v in summary.items()])
    if adapter_dir is not None:
        # the PEFT folder only: optimizer/RNG state and manifests stay with the Ray checkpoint
        for name in ADAPTER_FILES:
            mlflow_client.log_artifact(run_id, str(Path(adapter_dir) / name), ADAPTER_ARTIFACT)
    mlflow_client.set_terminated(run_id, status=status)


def register_adapter(mlflow_client: Any, model_name: str, run_id: str, alias: str, tags: dict[str, str]) -> Any:
    """Register the run's adapter folder as a new model version and point `alias` at it."""
    from mlflow.exceptions import MlflowException

    try:
        mlflow_client.create_registered_model(model_name, description="LoRA adapters found by loraforge sweeps")
    except MlflowException as err:
        if "RESOURCE_ALREADY_EXISTS" not in str(err.error_code):
            raise
    version = mlflow_client.create_model_version(
        model_name, source=f"runs:/{run_id}/{ADAPTER_ARTIFACT}", run_id=run_id, tags=tags
    )
    mlflow_client.set_registered_model_alias(model_name, alias, version.version)
    return version


def download_registered(tracking_uri: str, model_name: str, alias: str, dst_dir: Path) -> Path:
    """Fetch the files of `models:/<name>@<alias>` into `dst_dir`: the registry resolves the alias
    to a version and the version to its artifact location."""
    version = client(tracking_uri).get_model_version_by_alias(model_name, alias)
    return download_version(tracking_uri, model_name, version.version, dst_dir)


def download_version(tracking_uri: str, model_name: str, version: str, dst_dir: Path) -> Path:
    """Fetch the files of one registered model version into `dst_dir`."""
    import mlflow.artifacts

    source = client(tracking_uri).get_model_version_download_uri(model_name, version)
    dst_dir.mkdir(parents=True, exist_ok=True)
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dst_dir), tracking_uri=tracking_uri))


def fetch_adapter(ref: str, tracking_uri: str, dst_dir: Path) -> Path:
    """A local adapter folder for `ref`: a folder, `models:/name/version`, `models:/name@alias` or `runs:/id/path`."""
    if Path(ref).is_dir():
        return Path(ref)
    if ref.startswith("models:/"):
        name, sep, alias = ref.removeprefix("models:/").partition("@")
        if sep:
            return download_registered(tracking_uri, name, alias, dst_dir)
        name, _, version = name.partition("/")
        return download_version(tracking_uri, name, version, dst_dir)
    if ref.startswith("runs:/"):
        import mlflow.artifacts

        dst_dir.mkdir(parents=True, exist_ok=True)
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=ref, dst_path=str(dst_dir), tracking_uri=tracking_uri))
    raise ValueError(f"{ref!r} is neither an adapter folder nor a models:/ or runs:/ URI")
