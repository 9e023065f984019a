"""MLflow: the one module that talks to the tracking server and the Model Registry.

Layout of a sweep in MLflow: one parent run (the sweep) with params from the
validated config; one nested run per trial (tag `mlflow.parentRunId`) with the
trial's own params, per-step loss/lr from the rank-0 worker and eval metrics; the
winner's adapter folder registered as a model version and given an alias.
Clients are created where they are used (driver, trial actor, rank-0 worker),
never at import: Ray actors are separate processes.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any, Iterator

from pipeline import outbox, redact, tracking_server
from pipeline.config import ConfigError, ExperimentConfig
from pipeline.outbox import raw_client

PARENT_TAG = "mlflow.parentRunId"
TRIAL_TAG = "loraforge.trial_id"
RUN_NAME_TAG = "mlflow.runName"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "loraforge.json")
ADAPTER_ARTIFACT = "adapter"
CONFIG_ARTIFACT = "config.yaml"  # the resolved config, secrets masked
ADAPTER_SUBPATH = "artifacts/adapter"  # the PEFT folder inside a registered version's files (an MLflow Model)


def adapter_dir(downloaded: Path) -> Path:
    """The PEFT folder in a downloaded version: `artifacts/adapter/` of an MLflow Model, else the folder itself."""
    inside = downloaded / ADAPTER_SUBPATH
    return inside if (downloaded / "MLmodel").is_file() and inside.is_dir() else downloaded


def client(tracking_uri: str) -> Any:
    """MLflow's client; for an HTTP server with an outbox folder set, one whose writes survive the server
    going away (`pipeline.outbox`)."""
    mlflow_client = raw_client(tracking_uri)
    root = os.environ.get(outbox.ENV_VAR)
    if root and tracking_uri.startswith(("http://", "https://")):
        return outbox.ResilientClient(mlflow_client, outbox.Outbox(Path(root)))
    return mlflow_client


@contextlib.contextmanager
def process_uri(tracking_uri: str, experiment_id: str | None = None) -> Iterator[None]:
    """MLflow's process-wide tracking/registry URI (and experiment) set for a block: its fluent APIs read them.

    Afterwards the process is as before: `mlflow.set_tracking_uri` also writes MLFLOW_TRACKING_URI into the
    environment, which later config loads would take as an override.
    """
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved_env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID",
                                                "MLFLOW_EXPERIMENT_NAME")}
    saved = tracking_utils._tracking_uri, registry_utils._registry_uri
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    if experiment_id is not None:
        os.environ.pop("MLFLOW_EXPERIMENT_NAME", None)
        os.environ["MLFLOW_EXPERIMENT_ID"] = experiment_id
    try:
        yield
    finally:
        tracking_utils._tracking_uri, registry_utils._registry_uri = saved
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def artifact_location(tracking_uri: str) -> str | None:
    """Artifacts next to a SQLite store (absolute), so every process writes to the same place."""
    if tracking_uri.startswith("sqlite:///"):
        db_path = Path(tracking_uri[len("sqlite:///"):])
        return (db_path.parent / "mlartifacts").resolve().as_uri()
    return None


DATABASE_SCHEMES = ("postgresql", "postgres", "mysql", "mssql")
DATABASE_PROBE_TIMEOUT_S = 10


def probe_database(tracking_uri: str) -> None:
    """One connection attempt with a short timeout: MLflow's own engine retries a down database for ~110 s."""
    import sqlalchemy

    scheme = tracking_uri.split("://", 1)[0].split("+")[0]
    connect_args = {"connect_timeout": DATABASE_PROBE_TIMEOUT_S} if scheme in ("postgresql", "postgres", "mysql") else {}
    try:
        engine = sqlalchemy.create_engine(tracking_uri, connect_args=connect_args, poolclass=sqlalchemy.pool.NullPool)
        try:
            with engine.connect():
                pass
        finally:
            engine.dispose()
    except Exception as err:
        reason = redact.redact_text(str(getattr(err, "orig", None) or err)).strip().splitlines()[0]
        raise ConfigError([f"tracking.tracking_uri: the database {redact.redact_text(tracking_uri)} does not answer "
                           f"({err.__class__.__name__}: {reason}); start it, or fix the host, port, user or database "
                           "name in the URI"]) from None


def preflight(tracking_uri: str, experiment_name: str, model_name: str | None = None) -> str:
    """Reach the store, check the user may write the experiment and model, get or create the experiment
    and return its id; ConfigError naming the problem if it is unusable.

    HTTP servers are probed with short requests first (`pipeline.tracking_server`): MLflow's
    own client retries for minutes before it gives up.
    """
    user = None
    if tracking_uri.startswith(("http://", "https://")):
        tracking_server.check_reachable(tracking_uri)
        user = tracking_server.current_user(tracking_uri)
    elif tracking_uri.startswith("sqlite:///"):
        db_dir = Path(tracking_uri[len("sqlite:///"):]).parent
        if not db_dir.is_dir():
            raise ConfigError([f"tracking.tracking_uri: folder {str(db_dir)!r} for the SQLite store does not exist"])
        if not os.access(db_dir, os.W_OK):
            raise ConfigError([f"tracking.tracking_uri: folder {str(db_dir)!r} is not writable"])
    elif "://" in tracking_uri and tracking_uri.split("://", 1)[0].split("+")[0] in DATABASE_SCHEMES:
        probe_database(tracking_uri)
    try:
        mlflow_client = client(tracking_uri)
        if user is not None:
            if problems := tracking_server.check_permissions(mlflow_client, user, experiment_name, model_name):
                raise ConfigError(problems)
        return ensure_experiment(mlflow_client, experiment_name, tracking_uri)
    except ConfigError:
        raise
    except Exception as err:  # any store error means nothing can be tracked: stop before training
        raise ConfigError([f"tracking.tracking_uri: cannot use MLflow store {tracking_uri}: {redact.redact_text(str(err))}"]) from None


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

    walk(redact.redact(config.model_dump(mode="json", exclude={"sweep"})), "")
    return flat


def log_params(mlflow_client: Any, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    secrets = redact.secret_values()
    items = [Param(key, str(redact.redact(str(value), key, secrets))) for key, value in params.items()]
    for start in range(0, len(items), 100):  # MLflow's batch limit is 100 params
        mlflow_client.log_batch(run_id, params=items[start : start + 100])


def set_tags(mlflow_client: Any, run_id: str, tags: dict[str, str]) -> None:
    from mlflow.entities import RunTag

    items = [RunTag(k, str(v)) for k, v in redact.redact(tags).items()]
    for start in range(0, len(items), 100):
        mlflow_client.log_batch(run_id, tags=items[start:start + 100])


def record_lineage(mlflow_client: Any, run_id: str, config: ExperimentConfig, lineage: dict[str, Any] | None) -> None:
    """What a run was made from: the resolved config (YAML artifact), its datasets as inputs, code and base tags."""
    import yaml

    mlflow_client.log_text(run_id, yaml.safe_dump(redact.redact(config.model_dump(mode="json")), sort_keys=False),
                           CONFIG_ARTIFACT)
    if lineage:
        set_tags(mlflow_client, run_id, lineage["tags"])
        if hasattr(mlflow_client, "log_datasets"):  # an outbox client: queued with the run's other writes
            mlflow_client.log_datasets(run_id, lineage["datasets"])
        else:
            outbox.log_datasets(mlflow_client, run_id, lineage["datasets"])


def start_parent_run(mlflow_client: Any, experiment_id: str, config: ExperimentConfig, trial_count: int,
                     lineage: dict[str, Any] | None = None) -> str:
    run = mlflow_client.create_run(
        experiment_id,
        run_name=config.name,
        tags={"loraforge.kind": "sweep", "loraforge.searcher": config.sweep.searcher},
    )
    record_lineage(mlflow_client, run.info.run_id, config, lineage)
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
    lineage: dict[str, Any] | None = None,
) -> str:
    """A nested run for one trial; params are the trial's full config plus what the sweep sampled."""
    run = mlflow_client.create_run(
        experiment_id,
        run_name=trial_name,
        tags={PARENT_TAG: parent_run_id, TRIAL_TAG: trial_id, "loraforge.kind": "trial"},
    )
    record_lineage(mlflow_client, run.info.run_id, config, lineage)
    params = flat_params(config)
    params.update({f"sampled.{k}": "+".join(map(str, v)) if isinstance(v, list) else v for k, v in sampled.items()})
    log_params(mlflow_client, run.info.run_id, params)
    return run.info.run_id


class MetricBuffer:
    """Collects per-step metrics and sends them in batches (one store write per flush) from a background
    thread, so a slow or distant tracking server never stalls the training loop; batches go out in order."""

    def __init__(self, mlflow_client: Any, run_id: str, flush_every: int = 50):
        from concurrent.futures import ThreadPoolExecutor

        self.client = mlflow_client
        self.run_id = run_id
        self.flush_every = flush_every
        self.pending: list[Any] = []
        self._sender = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow-metrics")
        self._sent: list[Any] = []

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending.extend(Metric(key, float(value), now, step) for key, value in metrics.items())
        if len(self.pending) >= self.flush_every:
            self.flush()

    def _send(self, batch: list[Any]) -> None:
        for start in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[start : start + 1000])

    def flush(self, wait: bool = False) -> None:
        """Hand the pending metrics to the sender (`wait`: until they are sent); raises what a batch raised."""
        for future in [f for f in self._sent if f.done() or wait]:
            self._sent.remove(future)
            future.result()
        if self.pending:
            batch, self.pending = self.pending, []
            future = self._sender.submit(self._send, batch)
            if wait:
                future.result()
            else:
                self._sent.append(future)

    def close(self) -> None:
        """Send what is left and wait until every batch is on the server (or in the outbox)."""
        self.flush(wait=True)
        self._sender.shutdown(wait=True)


def start_system_metrics(config: ExperimentConfig, run_id: str, resume: bool = False) -> Any:
    """MLflow's own sampler (psutil: CPU, RAM, disk, network; GPU via nvidia-ml-py when there is one) on the
    trial's run, from its rank-0 worker; it logs directly, so a gap while the server is down is expected."""
    interval = config.tracking.system_metrics_interval_s
    if not interval:
        return None
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval, resume_logging=resume,
                                   tracking_uri=config.tracking.tracking_uri)
    monitor.start()
    return monitor


def find_trial_run(mlflow_client: Any, experiment_id: str, parent_run_id: str, trial_id: str) -> str | None:
    runs = mlflow_client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}' and tags.`{TRIAL_TAG}` = '{trial_id}'",
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def trial_run(mlflow_client: Any, experiment_id: str, parent_run_id: str, trial_id: str, trial_name: str,
              config: ExperimentConfig, sampled: dict[str, Any], lineage: dict[str, Any] | None = None) -> str:
    """The trial's nested run, created on first use: a restarted worker group, a PBT generation
    and a `--resume`d sweep find the run the trial started in."""
    if (run_id := find_trial_run(mlflow_client, experiment_id, parent_run_id, trial_id)) is not None:
        return run_id
    return start_trial_run(mlflow_client, experiment_id, parent_run_id, trial_id, trial_name, config, sampled, lineage)


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


def download_registered(tracking_uri: str, model_name: str, alias: str, dst_dir: Path) -> Path:
    """Fetch `models:/<name>@<alias>` into `dst_dir` (its PEFT folder): the registry resolves the alias
    to a version and the version to its artifact location."""
    version = client(tracking_uri).get_model_version_by_alias(model_name, alias)
    return download_version(tracking_uri, model_name, version.version, dst_dir)


def download_version(tracking_uri: str, model_name: str, version: str, dst_dir: Path) -> Path:
    """Fetch one registered model version into `dst_dir`; returns its PEFT folder."""
    import mlflow.artifacts

    source = client(tracking_uri).get_model_version_download_uri(model_name, version)
    dst_dir.mkdir(parents=True, exist_ok=True)
    downloaded = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dst_dir), tracking_uri=tracking_uri)
    # an MLflow Model (MLmodel + artifacts/adapter/) or, registered before that, the bare PEFT folder
    return adapter_dir(Path(downloaded))


def fetch_adapter(ref: str, tracking_uri: str, dst_dir: Path) -> Path:
    """A local adapter folder for `ref`: a folder, `models:/name/version`, `models:/name@alias` or `runs:/id/path`.

    ConfigError naming `ref` and the store when the store has no such model, alias, version or run.
    """
    from mlflow.exceptions import MlflowException

    try:
        return _fetch_adapter(ref, tracking_uri, dst_dir)
    except MlflowException as err:
        if not any(code in str(err.error_code) for code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")):
            raise
        raise ConfigError([f"{ref}: not in {redact.redact_text(tracking_uri)} ({redact.redact_text(err.message)}); list "
                           "what is registered with `loraforge models`, or pass an adapter folder"]) from None


def _fetch_adapter(ref: str, tracking_uri: str, dst_dir: Path) -> Path:
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
    raise ConfigError([f"{ref!r} is neither an adapter folder nor a models:/ or runs:/ URI"])
