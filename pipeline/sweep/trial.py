"""The Tune function trainable: one trial is one Ray Train run (or one pack of configs) of the sampled config."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from pipeline import checkpoint as ckpt
from pipeline import warmpool
from pipeline.config import ExperimentConfig
from pipeline.pack_train import train_pack_per_worker
from pipeline.storage import Storage
from pipeline.sweep.checkpoints import PBT_ORIGIN, pbt_generation, train_run_dir
from pipeline.sweep.space import PACK_KEY, dotted_path
from pipeline.train import train_fn_per_worker


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
    sampled = {} if members else {dotted_path(k): v for k, v in tune_config.items()}
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
                               "generation": pbt_generation(run_dir.name)}
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
