"""Joining the Ray cluster a run uses, or starting a local one, and the environment its processes inherit.

Every stage that needs Ray (the sweep, the evaluation stage, `loraforge eval`) comes through here.
"""

from __future__ import annotations

import json
import os

from pipeline import outbox, warmpool
from pipeline.config import ConfigError, ExperimentConfig

# Faster failure detection and trial turnover than Ray's 2 s polling, without the
# CPU that 0.1 s polling takes from training on a small machine; set before Ray
# starts so the controller and workers inherit it.
RAY_ENV_DEFAULTS = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    "RAY_TRAIN_V2_ENABLED": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    # a tracking server that went away: fail a write in seconds (it waits in the outbox) instead of
    # MLflow's default of about four minutes of retries
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


def set_env_defaults() -> None:
    # Ctrl-C goes to pipeline.interrupts (which hands it to Tune's graceful stop), not to Tune's own handler,
    # after which Tuner.fit returns as if the sweep had ended
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    for key, value in RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


GCS_PROBE_TIMEOUT_S = 10


def probe_cluster(address: str) -> None:
    """One TCP connect to `ray.address` with a short timeout: `ray.init` retries an absent GCS forever."""
    import socket

    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if address == "auto" or not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=GCS_PROBE_TIMEOUT_S).close()
    except OSError as err:
        raise ConfigError([f"ray.address {address}: nothing answers there ({err.strerror or err}); the cluster is gone "
                           "or not started. Start it, or point RAY_ADDRESS / ray.address at a running one (unset: a "
                           "local instance)"]) from None


def connect_ray(config: ExperimentConfig) -> bool:
    """Join `ray.address` (RAY_ADDRESS already folded into the config) or start a local instance.

    True when this call started a local instance: its processes inherit this process's
    environment, so no job runtime env is needed (and the warm pool can match workers).
    """
    import ray

    if ray.is_initialized():
        return False
    if config.ray.address:
        # inside a Ray job, variables its runtime env sets already reach every worker; Ray refuses to set them twice
        job_env = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}").get("runtime_env", {}).get("env_vars") or {}
        env_vars = {k: os.environ[k] for k in (*RAY_ENV_DEFAULTS, outbox.ENV_VAR) if k in os.environ and k not in job_env}
        probe_cluster(config.ray.address)
        ray.init(address=config.ray.address, runtime_env={"env_vars": env_vars}, log_to_driver=True)
        return False
    # one machine has no spot preemption to watch; the watcher is one more process per trial
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # the dashboard serves the state API, which Ray Train V2 uses to clean up
    # finished trials' placement groups; without it later trials wait forever
    system_config = {"preload_python_modules": warmpool.PRELOAD_MODULES} if config.ray.warm_workers else None
    ray.init(num_cpus=config.ray.num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=True,
             _system_config=system_config)
    return True
