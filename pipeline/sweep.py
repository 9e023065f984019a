"""The sweep: search space, per-trial driver function, resources, and the Tuner over them.

Ray's three layers (Train V2): `train_fn_per_worker` (pipeline.train) runs on
each worker; `run_trial` is the Tune function trainable that builds a
`TorchTrainer` for one sampled config and reports through `TuneReportCallback`;
`run_sweep` builds the `Tuner`. Concurrency comes from the cluster's real
resources so trials x workers never oversubscribe it.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray.tune import Callback

from pipeline import adapters, data, interrupts, redact, tracking, warmpool
from pipeline import checkpoint as ckpt
from pipeline.config import ConfigError, ExperimentConfig, ParamDomain
from pipeline.pack import member_name
from pipeline.pack_train import member_trial_id, train_pack_per_worker
from pipeline.storage import Storage
from pipeline.train import train_fn_per_worker

# The trial's own actor only builds a trainer and waits; it gets no CPU so that all
# CPUs go to train workers. Ray refuses an empty bundle, hence a token of memory.
TRIAL_ACTOR_RESOURCES = {"CPU": 0, "memory": 1024 * 1024}
# a packed sweep's one Tune parameter: the JSON list of the sampled values of a pack's configs
PACK_KEY = "pack"


class SweepError(RuntimeError):
    """The sweep ran but produced nothing usable (every trial failed, metric never reported)."""


def _key(path: str) -> str:
    # Tune flattens nested config keys with "/"; dots stay inside one key
    return path.replace(".", "__")


def _path(key: str) -> str:
    return key.replace("__", ".")


def tune_domain(domain: ParamDomain, searcher: str = "grid") -> Any:
    from ray import tune

    match domain.kind:
        case "grid":
            return tune.grid_search(domain.grid)
        case "pow2":
            return tune.grid_search(domain.values()) if searcher == "grid" else tune.choice(domain.values())
        case "choice":
            return tune.choice(domain.choice)
        case "uniform":
            return tune.uniform(*domain.uniform)
        case "loguniform":
            return tune.loguniform(*domain.loguniform)
        case "randint":
            return tune.randint(*domain.randint)
    raise ValueError(domain.kind)


def reports_per_trial(config: ExperimentConfig, num_train_examples: int) -> int:
    """How many times a full trial reports (ASHA's max_t in `training_iteration` units)."""
    train = config.train
    n = min(num_train_examples, config.data.max_train_examples or num_train_examples)
    total_steps = data.steps_per_epoch(n, train.batch_size, train.grad_accum, train.num_workers) * train.epochs
    return math.ceil(total_steps / train.eval_every_steps)


def workload(configs: list[ExperimentConfig], num_train_examples: int, trials: int, concurrency: int,
             time_budget_s: float | None) -> str:
    """One line on what the sweep will cost: trial-steps (an upper bound: ASHA stops trials early)
    and device-hours, bounded by the time budget when there is one."""
    steps = max(
        data.steps_per_epoch(min(num_train_examples, c.data.max_train_examples or num_train_examples),
                             c.train.batch_size, c.train.grad_accum, c.train.num_workers) * c.train.epochs
        for c in configs)
    gpus = max(c.train.num_workers * c.train.gpus_per_worker for c in configs)
    devices, kind = (gpus, "GPU") if gpus else (max(c.train.num_workers * c.train.cpus_per_worker for c in configs), "CPU")
    line = (f"{trials} trials x <= {steps} optimizer steps = <= {trials * steps} trial-steps; "
            f"{devices:g} {kind}(s) per trial, {concurrency} at a time")
    if time_budget_s:
        return line + f"; <= {concurrency * devices * time_budget_s / 3600:.2f} {kind}-hours (sweep.time_budget_s)"
    return line + f"; {kind}-hours = trial-steps x seconds per step x {devices:g} / 3600 (set sweep.time_budget_s to cap it)"


def grid_points(sweep: Any) -> list[dict[str, Any]]:
    """Every combination of the sweep's values ({dotted path: value}); bounds for continuous domains."""
    paths = list(sweep.parameters)
    axes = [domain.values() for domain in sweep.parameters.values()]
    return [dict(zip(paths, combo)) for combo in itertools.product(*axes)]


def candidate_configs(config: ExperimentConfig) -> list[ExperimentConfig]:
    """Every trial config a finite search space can produce (bounds for continuous domains)."""
    return [config.trial_config(point) for point in grid_points(config.sweep)] or [config.trial_config({})]


@dataclass
class Resources:
    cpus: float
    gpus: float
    max_node_cpus: float
    max_node_gpus: float
    nodes: int = 1
    max_node_memory: float = 0.0  # bytes (Ray's `memory` resource of the largest node)


def cluster_resources() -> Resources:
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    # a submitted job's driver holds entrypoint_num_cpus of the cluster's CPUs (pipeline.jobs)
    driver_cpus = float(os.environ.get("LORAFORGE_DRIVER_CPUS") or 0)
    return Resources(
        cpus=sum(n["Resources"].get("CPU", 0) for n in nodes) - driver_cpus,
        gpus=sum(n["Resources"].get("GPU", 0) for n in nodes),
        max_node_cpus=max((n["Resources"].get("CPU", 0) for n in nodes), default=0),
        max_node_gpus=max((n["Resources"].get("GPU", 0) for n in nodes), default=0),
        nodes=len(nodes),
        max_node_memory=max((n["Resources"].get("memory", 0) for n in nodes), default=0),
    )


def plan_concurrency(configs: list[ExperimentConfig], resources: Resources, requested: int | None) -> int:
    """Trials that fit at once; ConfigError naming the numbers when one trial cannot fit at all."""
    problems = []
    fits = []
    for cfg in configs:
        t = cfg.train
        if t.cpus_per_worker > resources.max_node_cpus:
            problems.append(
                f"train.cpus_per_worker={t.cpus_per_worker} but the largest node has {resources.max_node_cpus:g} CPUs"
            )
        if t.gpus_per_worker > 0 and t.gpus_per_worker > resources.max_node_gpus:
            problems.append(
                f"train.gpus_per_worker={t.gpus_per_worker:g} but the largest node has {resources.max_node_gpus:g} GPUs"
            )
        cpu_need = t.num_workers * t.cpus_per_worker
        gpu_need = t.num_workers * t.gpus_per_worker
        if cpu_need > resources.cpus:
            problems.append(
                f"train.num_workers={t.num_workers} x train.cpus_per_worker={t.cpus_per_worker} = {cpu_need} CPUs per trial, "
                f"but the cluster has {resources.cpus:g}; lower num_workers or cpus_per_worker"
            )
        if gpu_need > resources.gpus:
            problems.append(
                f"train.num_workers={t.num_workers} x train.gpus_per_worker={t.gpus_per_worker:g} = {gpu_need:g} GPUs per trial, "
                f"but the cluster has {resources.gpus:g}; lower num_workers or gpus_per_worker"
            )
        by_cpu = resources.cpus // cpu_need
        by_gpu = resources.gpus // gpu_need if gpu_need else by_cpu
        fits.append(int(min(by_cpu, by_gpu)))
    if problems:
        raise ConfigError(sorted(set(problems)))
    concurrent = max(1, min(fits))
    if requested is not None:
        if requested > concurrent:
            raise ConfigError([
                f"sweep.max_concurrent_trials={requested} but only {concurrent} trial(s) fit in the cluster at once "
                f"({resources.cpus:g} CPUs, {resources.gpus:g} GPUs); lower it or leave it unset"
            ])
        concurrent = requested
    return concurrent


def run_trial(tune_config: dict[str, Any], *, setup: dict[str, Any]) -> None:
    """Tune function trainable: one trial = one Ray Train run of the sampled config.

    `tune_config` holds only what the searcher sampled; `setup` (the experiment and
    where to track it) is the same for every trial and travels via the object store.
    """
    trial_started = time.time()
    import ray.train
    from ray import tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback


    experiment = ExperimentConfig.model_validate(setup["experiment"])
    members = json.loads(tune_config[PACK_KEY]) if PACK_KEY in tune_config else None
    sampled = {} if members else {_path(k): v for k, v in tune_config.items()}
    config = experiment.trial_config(members[0] if members else sampled)
    context = tune.get_context()
    trial_id, trial_name = context.get_trial_id(), context.get_trial_name()

    # the trial's MLflow run is found or created by the rank-0 worker, whose process has MLflow loaded
    trial = {"experiment_id": setup["experiment_id"], "parent_run_id": setup["parent_run_id"],
             "trial_id": trial_id, "trial_name": trial_name, "sampled": sampled, "started": trial_started,
             "lineage": setup.get("lineage")}
    # names come from the trial id (and its PBT generation) so a restored sweep finds the same Train run;
    # PBT (local storage only) may have moved the trial to a later generation
    remote_fs = setup["storage_filesystem"]
    run_dir, pbt_start = ((Path(f"train-{trial_id}"), None) if remote_fs is not None
                          else train_run_dir(Path(setup["train_storage_path"]), trial_id))
    if pbt_start is not None:
        # the copy a PBT generation starts from (used only while its run has no checkpoint of its own),
        # and where it came from, for the trial's MLflow run
        trial["init_checkpoint"] = str(pbt_start)
        trial["pbt_origin"] = {**json.loads((pbt_start.parent / PBT_ORIGIN).read_text()),
                               "generation": _pbt_generation(run_dir.name)}
    # F9: a checkpoint deleted from storage that Ray's run snapshot still names would fail the restored run
    store = (Storage(remote_fs, setup["train_storage_path"], setup["storage_uri"]) if remote_fs is not None
             else Storage.of(setup["train_storage_path"]))
    run_path = f"{setup['train_storage_path']}/{run_dir.name}" if remote_fs is not None else str(run_dir)
    if gone := ckpt.repair_train_snapshot(store, run_path):
        trial["checkpoints_gone"] = gone
    train = config.train
    resources_per_worker = {"CPU": train.cpus_per_worker}
    if train.gpus_per_worker:
        resources_per_worker["GPU"] = train.gpus_per_worker
    train_fn, loop_config, num_to_keep = train_fn_per_worker, {"experiment": config.model_dump(mode="json"), "trial": trial}, 2
    if members:
        # one worker trains the pack's configs on one base (pipeline.pack_train); its CPUs are the plan's
        resources_per_worker["CPU"] = setup["pack_cpus"]
        asha = experiment.sweep.asha
        train_fn, loop_config = train_pack_per_worker, {
            "members": [{"config": experiment.trial_config(m).model_dump(mode="json"), "sampled": m} for m in members],
            "trial": trial, "threads": setup["pack_cpus"],
            "sweep": {"scheduler": experiment.sweep.scheduler, "metric": experiment.sweep.metric,
                      "mode": experiment.sweep.mode, "grace_period": asha.grace_period,
                      "reduction_factor": asha.reduction_factor}}
        # every checkpoint holds some config's evaluation (a config's best may be any of them): keep them all
        num_to_keep = None
    trainer = TorchTrainer(
        train_fn,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=1 if members else train.num_workers, use_gpu=train.gpus_per_worker > 0,
            resources_per_worker=resources_per_worker
        ),
        run_config=ray.train.RunConfig(
            name=run_dir.name,
            storage_path=setup["train_storage_path"],
            storage_filesystem=remote_fs,
            callbacks=[TuneReportCallback()],
            # workers started ahead by the warm pool have this runtime env (and the stack imported)
            worker_runtime_env={"env_vars": warmpool.WORKER_ENV_VARS} if setup["warm_pool"] else None,
            # a dead worker restarts the whole group from the latest valid checkpoint
            failure_config=ray.train.FailureConfig(max_failures=train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                # the best and one more: a trial killed mid-upload still has a complete best
                num_to_keep=num_to_keep,
                checkpoint_score_attribute=experiment.sweep.metric,
                checkpoint_score_order=experiment.sweep.mode,
            ),
        ),
    )
    trainer.fit()
    _wait_for_reports_to_reach_tune()


def _wait_for_reports_to_reach_tune(settle_s: float = 0.25, timeout_s: float = 60.0) -> None:
    """Return only once the trial's main thread has passed every Train report on to Tune.

    Ray 2.60 race: `TuneReportCallback` puts each report on a queue actor, and the trial
    actor's main thread moves it into the Tune session's one-slot result queue. When this
    function returns, Tune's wrapper puts its own "finished" marker into that queue. If the
    marker lands while the main thread holds the last report between the two queues, the
    main thread blocks forever on the full queue (seen in CI: a trial hung for 8 minutes
    after training finished). If the marker is taken first, the last report is lost. So:
    wait until both queues are empty and the session's report count has settled.
    """
    from ray.train._internal.session import get_session

    session = get_session()
    queue = getattr(session, "_inter_actor_queue", None)
    if queue is None or not hasattr(session, "result_queue"):
        return
    deadline = time.monotonic() + timeout_s
    last, since = None, time.monotonic()
    while time.monotonic() < deadline:
        state = (session.iteration, queue.empty(), session.result_queue.empty())
        if state != last:
            last, since = state, time.monotonic()
        elif state[1] and state[2] and time.monotonic() - since >= settle_s:
            return
        time.sleep(0.02)


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


def _complete(checkpoint_dir: Path) -> bool:
    return not ckpt.verify(checkpoint_dir)


def _trained_epochs(store: Storage, run_dir: str) -> float:
    """How many epochs the newest complete checkpoint of a Train run had trained (0 if none)."""
    epochs = [adapters.read_metadata(local).get("metrics", {}).get("epoch", 0.0)
              for local in map(store.local, store.dirs(run_dir, "checkpoint_*")) if _complete(local)]
    return max(epochs, default=0.0)


def best_complete_checkpoint(store: Storage, run_dir: str, metric: str, mode: str,
                             member: str | None = None) -> tuple[str, float] | None:
    """The best checkpoint of a Train run (a path on `store`) whose files are all there, by the metric
    saved inside it; of a packed trial, the best of config `member` (its subfolders)."""
    scored = []
    for checkpoint_dir in store.dirs(run_dir, "checkpoint_*"):
        if member is not None:
            if not store.exists(checkpoint_dir := f"{checkpoint_dir}/{member}"):
                continue
        local = store.local(checkpoint_dir)
        if _complete(local):
            value = adapters.read_metadata(local).get("metrics", {}).get(metric)
            if value is not None:
                scored.append((checkpoint_dir, float(value)))
    if not scored:
        return None
    return (max if mode == "max" else min)(reversed(scored), key=lambda item: item[1])


PBT_DIR = "pbt"
PBT_ORIGIN = "origin.json"  # beside a PBT copy: the trial, checkpoint and result it was copied from


def train_run_dir(train_storage_path: Path, trial_id: str) -> tuple[Path, Path | None]:
    """(the Ray Train run a trial trains in now, the checkpoint that run starts from or None).

    A trial's first Train run is `train-<trial id>`. Each time PBT makes it copy a better
    trial, the driver puts a copy of that trial's checkpoint in `pbt/train-<trial id>-pbt<n>/`
    and the trial continues in a new Train run of that name. Everything derives from
    storage, so a paused, restarted or `--resume`d trial finds its current run.
    """
    copies = [c for c in (train_storage_path / PBT_DIR).glob(f"train-{trial_id}-pbt*/checkpoint_*")
              if _pbt_generation(c.parent.name)]
    # the newest generation whose copy is complete (a copy is verified only when it is the candidate)
    latest = next((c for c in sorted(copies, key=lambda c: _pbt_generation(c.parent.name), reverse=True)
                   if _complete(c)), None)
    if latest is None:
        return train_storage_path / f"train-{trial_id}", None
    return train_storage_path / latest.parent.name, latest


def trial_run_path(store: Storage, train_storage_path: str, trial_id: str) -> str:
    """`train_run_dir`'s Train run as a path on `store` (PBT, which moves trials, needs local storage)."""
    if store.remote:
        return f"{train_storage_path}/train-{trial_id}"
    return str(train_run_dir(Path(train_storage_path), trial_id)[0])


def _pbt_generation(run_name: str) -> int:
    """n of `train-<trial id>-pbt<n>`; 0 for a trial's first Train run (or a staging dir)."""
    suffix = run_name.rsplit("-pbt", 1)[1] if "-pbt" in run_name else ""
    return int(suffix) if suffix.isdigit() else 0


def make_pbt(sweep: Any, train_storage_path: Path) -> Any:
    """Tune's PopulationBasedTraining over train.lr, exploiting through copies of Ray Train checkpoints.

    Trials report to Tune through Ray Train (metrics plus the path of the checkpoint just
    saved), so Tune itself holds no checkpoint to hand from one trial to another. When a
    trial lands in the top quantile its newest checkpoint is copied aside; when one lands in
    the bottom quantile the copy of a top trial is copied again into that trial's next PBT
    generation (`train_run_dir`), which its restarted Train run resumes from.
    """
    import random
    import shutil

    from ray import tune
    from ray.train import Checkpoint
    from ray.tune.schedulers import PopulationBasedTraining

    lr = sweep.parameters["train.lr"]
    mutation = lr.values() if lr.kind in ("grid", "choice") else tune_domain(lr, "random")
    pbt_root = train_storage_path / PBT_DIR

    def copy_checkpoint(source: Path, destination: Path, origin: dict[str, Any]) -> Path | None:
        if not source.is_dir() or not _complete(source):
            return None
        staging = destination.with_name(destination.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(source, staging / source.name)
        (staging / PBT_ORIGIN).write_text(json.dumps(origin))
        shutil.rmtree(destination, ignore_errors=True)
        staging.rename(destination)
        return destination / source.name

    class CheckpointCopyingPBT(PopulationBasedTraining):
        def _checkpoint_or_exploit(self, trial: Any, tune_controller: Any, upper_quantile: list,
                                   lower_quantile: list) -> None:
            state = self._trial_state[trial]
            state.last_checkpoint = None
            if trial in upper_quantile and (path := state.last_result.get("checkpoint_path")):
                # the checkpoint this result reported is on storage now; later ones may delete it
                kept = copy_checkpoint(Path(path), pbt_root / f"top-{trial.trial_id}", {
                    "trial_id": trial.trial_id, "checkpoint": path, "result": {
                        k: state.last_result.get(k) for k in ("step", "lr", "training_iteration", self._metric)}})
                state.last_checkpoint = Checkpoint(str(kept)) if kept else None
                self._num_checkpoints += 1
            if trial not in lower_quantile:
                return
            donor = random.choice(upper_quantile)
            donor_state = self._trial_state[donor]
            if donor_state.last_checkpoint is None:
                return  # the donor has no copy yet (it was not in the top at its last decision)
            current, _ = train_run_dir(train_storage_path, trial.trial_id)
            generation = _pbt_generation(current.name) + 1
            donor_copy = Path(donor_state.last_checkpoint.path)
            copied = copy_checkpoint(donor_copy, pbt_root / f"train-{trial.trial_id}-pbt{generation}",
                                     json.loads((donor_copy.parent / PBT_ORIGIN).read_text()))
            if copied is None:
                return
            # Tune restarts the trial from the donor state's checkpoint: hand it this trial's own copy
            kept, donor_state.last_checkpoint = donor_state.last_checkpoint, Checkpoint(str(copied))
            try:
                self._exploit(tune_controller, trial, donor)
            finally:
                donor_state.last_checkpoint = kept

    return CheckpointCopyingPBT(
        time_attr="training_iteration", perturbation_interval=sweep.pbt.perturbation_interval,
        hyperparam_mutations={_key("train.lr"): mutation}, quantile_fraction=sweep.pbt.quantile_fraction,
        resample_probability=sweep.pbt.resample_probability,
    )


def _pack_members(trial_config: dict[str, Any]) -> list[tuple[str, dict[str, Any]]] | None:
    """(name, sampled values) of a packed trial's configs; None for a trial of one config."""
    if PACK_KEY not in trial_config:
        return None

    return [(member_name(i), sampled) for i, sampled in enumerate(json.loads(trial_config[PACK_KEY]))]


# a packed config's state in the pack -> its trial status; LIVE ones take the pack trial's end instead
_PACK_STATUS = {"DONE": "DONE", "STOPPED": "STOPPED", "ERROR": "ERROR"}
_MLFLOW_STATUS = {"DONE": "FINISHED", "STOPPED": "FINISHED", "BUDGET": "KILLED", "ERROR": "FAILED",
                  "INTERRUPTED": "KILLED"}


def _killed_status() -> str:
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
        sampled = {_path(k): v for k, v in trial.config.items()}
        summary = self.trials.setdefault(trial.trial_id, TrialSummary(trial.trial_id, str(trial), sampled))
        if sampled != summary.sampled:
            # PBT restarted the trial from a copy of a better trial's checkpoint, with that trial's
            # config and a new lr: its best so far belonged to the config it left behind
            summary.sampled, summary.best_metric, summary.best_checkpoint = sampled, None, None
        return summary

    def _summaries(self, trial: Any) -> list[TrialSummary]:
        """The trial's config summaries: one, or one per config of a pack."""
        members = _pack_members(trial.config)
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
        if attach and not _complete(self.store.local(summary.best_checkpoint)):
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
        if _pack_members(trial.config) is not None:
            for summary in self._summaries(trial):
                if not summary.finished:
                    state = summary.last_result.get("status")
                    final = _PACK_STATUS.get(state) or {"FAILED": "ERROR", "KILLED": _killed_status()}.get(status, "DONE")
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
            summary.last_result["epoch"] = _trained_epochs(self.store, run_dir)
            if summary.best_checkpoint is None and (best := best_complete_checkpoint(self.store, run_dir, self.metric, self.mode)):
                summary.best_checkpoint, summary.best_metric = best
        trained_all = summary.last_result.get("epoch", 0) >= epochs - 1e-9
        match status:
            case "FAILED":
                final = "ERROR"
            case "KILLED":
                final = _killed_status()  # cut off by sweep.time_budget_s, or by a signal
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
            members = _pack_members(trial.config)
            ids = [trial.trial_id] if members is None else [member_trial_id(trial.trial_id, n) for n, _ in members]
            if any(i in self.trials and not self.trials[i].finished for i in ids):
                self._finish(trial, "KILLED")


def unique_run_name(store: Storage, name: str) -> str:
    """`name`, or `name-2`, `name-3` ... if an earlier sweep already used it (never silently reuse state)."""
    if not store.exists(store.path(name)):
        return name
    for n in itertools.count(2):
        if not store.exists(store.path(f"{name}-{n}")):
            return f"{name}-{n}"
    raise AssertionError("unreachable")


@dataclass
class SweepResult:
    run_name: str
    trials: list[TrialSummary]
    best: TrialSummary
    wall_s: float


def shuffled_grid(sweep: Any, seed: int, concurrency: int) -> tuple[dict[str, Any], Any, int]:
    """The grid (x num_samples) as Tune points to evaluate, in a random order seeded by `seed`.

    Tune's grid search always runs its points in one fixed order; a searcher that first
    evaluates every point in a given order, over `choice` domains of the same values, runs
    the same trials in ours. Tune does not apply `max_concurrent_trials` to a search
    algorithm passed in, so the generator gets the limit itself.
    """
    import random

    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    points = [{_key(path): value for path, value in point.items()} for point in grid_points(sweep)] * sweep.num_samples
    random.Random(seed).shuffle(points)
    param_space = {_key(path): tune.choice(domain.values()) for path, domain in sweep.parameters.items()}
    return param_space, BasicVariantGenerator(points_to_evaluate=points, max_concurrent=concurrency), len(points)


def make_search_alg(config: ExperimentConfig) -> Any:
    """Tune's searcher for `sweep.searcher`: OptunaSearch (TPE, seeded by train.seed), or None for Tune's
    own grid and random variant generation."""
    if config.sweep.searcher != "optuna":
        return None
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(seed=config.train.seed)


def make_scheduler(sweep: Any, max_t: int, train_storage_path: Path | None = None) -> Any:
    """The Tune scheduler of `sweep.scheduler`; time is counted in evaluations (`training_iteration`)."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule

    grace = min(sweep.asha.grace_period, max_t)
    match sweep.scheduler:
        case "asha":
            return ASHAScheduler(time_attr="training_iteration", max_t=max_t, grace_period=grace,
                                 reduction_factor=sweep.asha.reduction_factor)
        case "median":
            return MedianStoppingRule(time_attr="training_iteration", grace_period=grace,
                                      min_samples_required=sweep.median_min_samples)
        case "pbt":
            assert train_storage_path is not None, "pbt copies checkpoints under the sweep's Train storage"
            return make_pbt(sweep, train_storage_path)
    return FIFOScheduler()


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


def _summary_from_tracking(config: ExperimentConfig, experiment_id: str, parent_run_id: str, trial_id: str,
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


def run_sweep(
    config: ExperimentConfig, *, experiment_id: str, parent_run_id: str, num_train_examples: int, concurrency: int,
    resume_dir: str | None = None, lineage: dict[str, Any] | None = None, packing: Any = None,
) -> SweepResult:
    """Run every trial of the sweep under Tune and return their summaries, best first by the metric.

    With `resume_dir` (an interrupted sweep) Tune restores it: finished trials are kept,
    unfinished and errored ones run again, and each of those continues from its own Train
    run's latest checkpoint (the Train run name is derived from the trial id).
    """
    from ray import tune

    sweep = config.sweep
    max_t = max(reports_per_trial(c, num_train_examples) for c in candidate_configs(config))
    search_alg = make_search_alg(config)

    # a folder, or an object store that Tune and Train reach through the same pyarrow filesystem
    store = Storage.of(config.ray.storage_path)
    remote_fs = store.fs if store.remote else None
    store.mkdirs(store.root)
    run_name = Path(resume_dir).name if resume_dir else unique_run_name(store, config.name)
    train_storage_path = store.path(run_name, "train")
    # packed (`packing`: a pipeline.planner.PackPlan): halving happens inside each pack, Tune runs them to the end
    scheduler = make_scheduler(sweep, max_t, Path(train_storage_path)) if packing is None else None
    write_run_state(store, store.path(run_name), experiment_id, parent_run_id, config)
    callback = TrialRunCallback(config, experiment_id, parent_run_id, store, train_storage_path, lineage)
    setup = {
        "experiment": config.model_dump(mode="json"),
        "experiment_id": experiment_id,
        "parent_run_id": parent_run_id,
        "train_storage_path": train_storage_path,
        "storage_filesystem": remote_fs,
        "storage_uri": store.written,
        "warm_pool": warmpool.current() is not None,
        "lineage": lineage,
        "pack_cpus": packing.cpus_per_pack if packing is not None else None,
    }
    param_space = {_key(path): tune_domain(domain, sweep.searcher) for path, domain in sweep.parameters.items()}
    num_samples = sweep.num_samples
    if packing is not None:
        param_space, search_alg, num_samples = {PACK_KEY: tune.grid_search([json.dumps(p) for p in packing.packs])}, None, 1
    elif sweep.searcher == "grid" and sweep.grid_order == "shuffled" and sweep.parameters:
        param_space, search_alg, num_samples = shuffled_grid(sweep, seed=config.train.seed, concurrency=concurrency)
    started = time.time()
    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup), TRIAL_ACTOR_RESOURCES)
    if resume_dir is not None:
        tuner = tune.Tuner.restore(resume_dir, trainable, resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=remote_fs)
        # the run config comes back from Tune's pickle with a stale copy of the callback; use this one
        tuner._local_tuner.get_run_config().callbacks[:] = [callback]
        with interrupts.sweep_phase():
            results = tuner.fit()
        for result in results:
            trial_id = Path(result.path).name.removeprefix("trial_")
            members = _pack_members(result.config or {})
            if members is not None:
                for name, sampled in members:
                    if (member_id := member_trial_id(trial_id, name)) not in callback.trials:
                        callback.trials[member_id] = _summary_from_tracking(
                            config, experiment_id, parent_run_id, member_id, sampled, store, train_storage_path,
                            pack=trial_id, member=name)
            elif trial_id not in callback.trials:
                callback.trials[trial_id] = _summary_from_tracking(
                    config, experiment_id, parent_run_id, trial_id,
                    {_path(k): v for k, v in (result.config or {}).items()}, store, train_storage_path)
        return _sweep_result(config, run_name, list(callback.trials.values()), started)
    tuner = tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=sweep.metric, mode=sweep.mode, scheduler=scheduler, search_alg=search_alg,
            num_samples=num_samples, max_concurrent_trials=concurrency, time_budget_s=sweep.time_budget_s,
            trial_name_creator=lambda trial: f"trial_{trial.trial_id}",
            trial_dirname_creator=lambda trial: f"trial_{trial.trial_id}",
        ),
        # a trial whose node died (its Train controller with it) starts again; its Train run resumes from
        # the last checkpoint on ray.storage_path
        run_config=tune.RunConfig(name=run_name, storage_path=store.root, storage_filesystem=remote_fs,
                                  callbacks=[callback], verbose=1,
                                  failure_config=tune.FailureConfig(max_failures=config.train.max_failures)),
    )
    with interrupts.sweep_phase():
        tuner.fit()
    return _sweep_result(config, run_name, list(callback.trials.values()), started)


def _sweep_result(config: ExperimentConfig, run_name: str, trials: list[TrialSummary], started: float) -> SweepResult:
    sweep = config.sweep
    scored = [t for t in trials if t.best_metric is not None and t.best_checkpoint and t.status != "ERROR"]
    if not scored:
        errors = "; ".join(f"{t.trial_name}: {(t.error or t.status).strip().splitlines()[-1]}" for t in trials)
        raise SweepError(f"no trial reported {sweep.metric!r} with a checkpoint ({errors or 'no trials ran'})")
    reverse = sweep.mode == "max"
    scored.sort(key=lambda t: t.best_metric, reverse=reverse)
    ordered = scored + [t for t in trials if t not in scored]
    return SweepResult(run_name=run_name, trials=ordered, best=scored[0], wall_s=time.time() - started)
