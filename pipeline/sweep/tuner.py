"""The Tuner over every trial of the sweep: a fresh one, or Tune's restore of an interrupted one."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from pipeline import interrupts, warmpool
from pipeline.config import ExperimentConfig
from pipeline.pack_train import member_trial_id
from pipeline.storage import Storage
from pipeline.sweep.callback import TrialRunCallback
from pipeline.sweep.resources import TRIAL_ACTOR_RESOURCES, reports_per_trial
from pipeline.sweep.results import SweepResult, sweep_result
from pipeline.sweep.resume import summary_from_tracking, unique_run_name, write_run_state
from pipeline.sweep.schedulers import make_scheduler
from pipeline.sweep.space import (PACK_KEY, candidate_configs, dotted_path, make_search_alg, pack_members, param_key,
                                  shuffled_grid, tune_domain)
from pipeline.sweep.trial import run_trial


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
    # packed (`packing`: a pipeline.sweep.planner.PackPlan): halving happens inside each pack, Tune runs them to the end
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
    param_space = {param_key(path): tune_domain(domain, sweep.searcher) for path, domain in sweep.parameters.items()}
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
            members = pack_members(result.config or {})
            if members is not None:
                for name, sampled in members:
                    if (member_id := member_trial_id(trial_id, name)) not in callback.trials:
                        callback.trials[member_id] = summary_from_tracking(
                            config, experiment_id, parent_run_id, member_id, sampled, store, train_storage_path,
                            pack=trial_id, member=name)
            elif trial_id not in callback.trials:
                callback.trials[trial_id] = summary_from_tracking(
                    config, experiment_id, parent_run_id, trial_id,
                    {dotted_path(k): v for k, v in (result.config or {}).items()}, store, train_storage_path)
        return sweep_result(config, run_name, list(callback.trials.values()), started)
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
    return sweep_result(config, run_name, list(callback.trials.values()), started)
