"""What a sweep costs and how many trials fit the cluster at once."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from pipeline import data
from pipeline.config import ConfigError, ExperimentConfig

# The trial's own actor only builds a trainer and waits; it gets no CPU so that all
# CPUs go to train workers. Ray refuses an empty bundle, hence a token of memory.
TRIAL_ACTOR_RESOURCES = {"CPU": 0, "memory": 1024 * 1024}


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
