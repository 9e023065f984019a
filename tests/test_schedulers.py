"""Tune's own ASHA, median stopping and Optuna, built from loraforge configs, on a trial whose metric is known.

The trainable reports a curve fixed by its sampled lr (best at 1e-3), so which trials a scheduler
must stop, and where, is known in advance: the real schedulers and searcher decide, the test checks.
Real training under these schedulers runs in test_pipeline_e2e (ASHA) and test_pbt (PBT).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.sweep import make_scheduler, make_search_alg, tune_domain
from tests.support.configs import minilm_config, write_yaml

pytestmark = pytest.mark.slow

REPORTS = 8


def known_curve(config: dict) -> None:
    from ray import tune

    quality = max(0.0, 1 - abs(math.log10(config["train__lr"]) + 3) / 3)  # 1 at lr 1e-3, 0 at 1e-6
    for i in range(1, REPORTS + 1):
        tune.report({"eval_accuracy": 0.5 + 0.4 * quality * i / REPORTS})


def sweep(tmp_path: Path, sst2_small, train: dict | None = None, **sweep_section):
    from ray import tune

    tmp_path.mkdir(parents=True, exist_ok=True)
    raw = minilm_config(tmp_path, sst2_small, sweep=sweep_section, train=train or {})
    config = load_config(write_yaml(tmp_path / "c.yaml", raw), env={})
    space = {k.replace(".", "__"): tune_domain(d, config.sweep.searcher) for k, d in config.sweep.parameters.items()}
    tuner = tune.Tuner(
        known_curve, param_space=space,
        tune_config=tune.TuneConfig(metric="eval_accuracy", mode="max", num_samples=config.sweep.num_samples,
                                    scheduler=make_scheduler(config.sweep, REPORTS), search_alg=make_search_alg(config),
                                    max_concurrent_trials=1, reuse_actors=True),
        run_config=tune.RunConfig(storage_path=str(tmp_path / "tune"), verbose=0))
    results = tuner.fit()
    return config, {r.config["train__lr"]: r for r in results}


LRS = {"grid": [1e-3, 1e-4, 1e-5, 1e-6]}  # best first: each later one is worse than everything before it


def test_asha_stops_the_worse_trials_at_the_first_rung(tmp_path: Path, sst2_small, ray_local):
    _, trials = sweep(tmp_path, sst2_small, searcher="grid", scheduler="asha",
                      asha={"grace_period": 1, "reduction_factor": 2}, parameters={"train.lr": LRS})
    iterations = {lr: r.metrics["training_iteration"] for lr, r in trials.items()}
    assert iterations == {1e-3: REPORTS, 1e-4: 1, 1e-5: 1, 1e-6: 1}


def test_median_rule_stops_trials_below_the_median_of_the_others(tmp_path: Path, sst2_small, ray_local):
    _, trials = sweep(tmp_path, sst2_small, searcher="grid", scheduler="median", median_min_samples=1,
                      asha={"grace_period": 2}, parameters={"train.lr": LRS})
    iterations = {lr: r.metrics["training_iteration"] for lr, r in trials.items()}
    assert iterations[1e-3] == REPORTS
    assert all(iterations[lr] == 2 for lr in (1e-4, 1e-5, 1e-6)), iterations  # stopped at the grace period


def test_optuna_samples_the_configured_domains_reproducibly(tmp_path: Path, sst2_small, ray_local):
    section = {"searcher": "optuna", "scheduler": "fifo", "num_samples": 4,
               "parameters": {"train.lr": {"loguniform": [1e-6, 1e-1]}}}
    config, first = sweep(tmp_path / "a", sst2_small, **section)
    assert config.sweep.searcher == "optuna" and len(first) == 4
    assert all(1e-6 <= lr <= 1e-1 for lr in first)
    assert all(r.metrics["training_iteration"] == REPORTS for r in first.values())  # fifo: none stopped
    _, second = sweep(tmp_path / "b", sst2_small, **section)
    assert list(first) == list(second)  # seeded by train.seed: the same lrs in the same order
    _, other_seed = sweep(tmp_path / "c", sst2_small, train={"seed": 1}, **section)
    assert list(other_seed) != list(first)
