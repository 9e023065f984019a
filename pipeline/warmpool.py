"""Warm worker processes, so that a trial's Ray Train run does not wait for Python to start.

Every trial is a full Ray Train run: a Tune trial actor builds a `TorchTrainer`, whose
controller actor starts a worker group. Ray starts a new process for each of these
actors, and a Train worker then imports torch, transformers and PEFT (about 6 s of one
core). That start-up was most of a short trial's wall time (B2).

Ray's raylet can start workers ahead of demand (its `PrestartWorkers` call, which the
first driver of a node also triggers). A started worker sits idle in the node's pool
and becomes the process of the next actor whose runtime env string is the same. So
while trials train, the pool starts the processes of the trials still to come, with
the runtime envs Tune and Train will give them (`runtime_envs`); the Train workers'
env carries a setup hook that imports the training stack before the worker goes idle.
Each trial start queues one more trial's worth, so the next trial in that slot finds
its processes ready. The imports then overlap training instead of delaying it; they
still cost CPU, which B2 reports next to the overhead.

Only for the local instance loraforge starts itself: there it knows every process's
environment. Any failure here leaves Ray starting workers on demand, as before.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import threading
from typing import Any

log = logging.getLogger("loraforge")

# run by each warm Train worker before it takes an actor. Ray runs a `worker_process_setup_hook`
# string from an actor's runtime env only through this env var (it converts the job's alone)
SETUP_HOOK_ENV = "__RAY_WORKER_PROCESS_SETUP_HOOK_ENV_VAR"
SETUP_HOOK = "pipeline.warmpool.import_training_stack"
# what the sweep gives Ray Train as the workers' own runtime env
WORKER_ENV_VARS = {SETUP_HOOK_ENV: SETUP_HOOK}
# imported by every worker of the local instance before it goes idle (trial actors, controllers)
PRELOAD_MODULES = ["ray.train.torch", "ray.tune.integration.ray_train", "pipeline.sweep", "pipeline.train",
                   "pipeline.pack_train"]
# how long an idle started worker is kept even if the node's pool is over its soft limit
KEEP_ALIVE_S = 3600


def import_training_stack() -> None:
    """Runs in a Train worker process before it accepts work: the imports of `train_fn_per_worker`.

    transformers imports lazily, so the names the loop uses are touched to load their modules.
    """
    import mlflow.store.model_registry.sqlalchemy_store  # noqa: F401
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
    import mlflow.tracking  # noqa: F401
    import peft  # noqa: F401
    import ray.train.torch  # noqa: F401
    import tqdm  # noqa: F401
    from transformers import (  # noqa: F401
        AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, get_scheduler)

    import pipeline.train  # noqa: F401


def _trial_env_vars() -> dict[str, str]:
    """The env vars Ray Tune 2.60 gives each trial actor (`ray.tune.execution.class_cache`)."""
    from ray.tune.execution.class_cache import DEFAULT_ENV_VARS, ENV_VARS_TO_PROPAGATE

    env_vars = dict(DEFAULT_ENV_VARS)
    env_vars.update({k: os.environ[k] for k in ENV_VARS_TO_PROPAGATE if k in os.environ})
    return env_vars


def _train_env_vars() -> dict[str, str]:
    """The env vars Ray Train 2.60 gives its controller, and the controller its workers."""
    from ray._common.constants import RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR
    from ray.train.v2._internal.constants import DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE, get_env_vars_to_propagate

    env_vars = get_env_vars_to_propagate()
    env_vars.setdefault(RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR, DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE)
    return env_vars


def runtime_envs() -> dict[str, tuple[dict[str, Any], bool]]:
    """Each kind of process a trial needs -> (its runtime env, whether Ray merged it with its creator's).

    Ray 2.60 starts, per trial, two actors with Tune's env (the function trainable and its
    result queue); four with that env merged with Train's env vars (the controller, and the
    SynchronizationActor, DatasetManager and PlacementGroupCleaner it creates); and the
    Train workers, with the controller's env plus the import hook.
    """
    trial = _trial_env_vars()
    train = {**trial, **_train_env_vars()}
    return {
        "trial": ({"env_vars": trial}, False),
        "controller": ({"env_vars": train}, True),
        "worker": ({"env_vars": {**train, **WORKER_ENV_VARS}}, True),
    }


def _starting_workers() -> int:
    """Worker processes of this machine's raylet that are still starting (not yet renamed `ray::...`)."""
    import psutil

    count = 0
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if any(part.endswith("default_worker.py") for part in cmdline[:3]):
            count += 1
    return count


class WarmPool:
    """Starts idle workers on this node's raylet for the trials still to run.

    The raylet starts at most `min(cores, CPUs)` workers at a time and drops prestart
    requests beyond that, so a feeder thread hands them over one by one as slots free up.
    """

    def __init__(self, workers_per_trial: int, trials: int) -> None:
        import ray
        from ray._private.grpc_utils import init_grpc_channel
        from ray.core.generated import node_manager_pb2_grpc

        node = next(n for n in ray.nodes() if n["Alive"] and n["NodeID"] == ray.get_runtime_context().get_node_id())
        channel = init_grpc_channel(f"{node['NodeManagerAddress']}:{node['NodeManagerPort']}")
        self._stub = node_manager_pb2_grpc.NodeManagerServiceStub(channel)
        self._job_id = bytes.fromhex(ray.get_runtime_context().get_job_id())
        self._slots = max(1, min(os.cpu_count() or 1, int(node["Resources"].get("CPU", 1))))
        # processes per trial of each kind in `runtime_envs`
        self.per_trial = {"trial": 2, "controller": 4, "worker": workers_per_trial}
        self.remaining = trials
        self.started = 0
        self.disabled = False
        self._pending: collections.deque[tuple[dict[str, Any], bool]] = collections.deque()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._feed, name="loraforge-warm-pool", daemon=True)
        self._thread.start()

    def _prestart(self, runtime_env: dict[str, Any], *, merged: bool) -> None:
        """Start one idle worker for actors with `runtime_env`.

        A worker is matched by the exact string of its actor's runtime env. An actor created
        by a process that has a runtime env of its own gets the merged env, which Ray's core
        worker writes as compact JSON; Python writes the others with spaces.
        """
        from ray._private.utils import get_runtime_env_info
        from ray.core.generated import common_pb2, node_manager_pb2
        from ray.runtime_env import RuntimeEnv

        info = get_runtime_env_info(RuntimeEnv(**runtime_env), serialize=False)
        if merged:
            info.serialized_runtime_env = json.dumps(runtime_env, sort_keys=True, separators=(",", ":"))
        self._stub.PrestartWorkers(node_manager_pb2.PrestartWorkersRequest(
            language=common_pb2.PYTHON, job_id=self._job_id, runtime_env_info=info, num_workers=1,
            keep_alive_duration_secs=KEEP_ALIVE_S), timeout=10)
        self.started += 1

    def _feed(self) -> None:
        while not self._stop.wait(0.2):
            if not self._pending or self.disabled:
                continue
            try:
                if _starting_workers() >= self._slots:
                    continue
                runtime_env, merged = self._pending[0]
                self._prestart(runtime_env, merged=merged)
                self._pending.popleft()
                self._stop.wait(0.3)  # let the raylet launch it before counting again
            except Exception as exc:  # an internal Ray API: fall back to on-demand workers, never fail the sweep
                log.warning("warm worker pool off (%s: %s); trials start their own processes", type(exc).__name__, exc)
                self.disabled = True

    def prepare(self, trials: int) -> None:
        """Queue the processes of up to `trials` more trials (never more than are left to run)."""
        trials = min(trials, self.remaining)
        if self.disabled or trials <= 0:
            return
        self.remaining -= trials
        envs = runtime_envs()
        for _ in range(trials):
            # in the order a trial asks for them: Tune's actors, Train's controller side, the workers
            for kind, (runtime_env, merged) in envs.items():
                self._pending.extend([(runtime_env, merged)] * self.per_trial[kind])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


_POOL: WarmPool | None = None


def activate(workers_per_trial: int, trials: int, concurrency: int) -> WarmPool | None:
    """Start the first `concurrency` trials' processes; the sweep tops up as trials start."""
    global _POOL
    try:
        _POOL = WarmPool(workers_per_trial, trials)
    except Exception as exc:
        log.warning("warm worker pool off (%s: %s)", type(exc).__name__, exc)
        _POOL = None
        return None
    # one spare set: the first trial also starts Ray Train's one-off actors (its autoscaling coordinator)
    _POOL.prepare(concurrency + 1)
    return _POOL


def current() -> WarmPool | None:
    return _POOL


def deactivate() -> None:
    global _POOL
    if _POOL is not None:
        _POOL.close()
        log.info("warm worker pool: started %d worker processes ahead of their trials", _POOL.started)
    _POOL = None

