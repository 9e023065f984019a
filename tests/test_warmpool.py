"""The warm worker pool: trials of a local instance run in processes started before they were.

Drives the real thing: `run_pipeline` starts its own local Ray instance (no fixture, so the
pool is on), the pool prestarts workers through the raylet, and each trial's rank-0 worker
reports how long before its trial its process existed (`worker_head_start_s`).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.configs import minilm_config, write_yaml
from pipeline import tracking, warmpool
from pipeline.config import load_config
from pipeline.run import run_pipeline

pytestmark = pytest.mark.slow


def test_trials_after_the_first_run_in_prestarted_workers(tmp_path: Path, sst2_small):
    import ray

    if ray.is_initialized():
        ray.shutdown()
    raw = minilm_config(tmp_path, sst2_small, sweep={"parameters": {"train.seed": {"grid": [0, 1, 2]}},
                                                     "max_concurrent_trials": 1})
    raw["train"]["eval_every_steps"] = 10
    raw["ray"]["warm_workers"] = True  # the product's default, which the other tests turn off
    config = load_config(write_yaml(tmp_path / "warm.yaml", raw), env={})
    assert config.ray.warm_workers
    try:
        result = run_pipeline(config)
    finally:
        ray.shutdown()
    assert warmpool.current() is None  # the run stopped its pool
    trials = sorted(result.sweep.trials, key=lambda t: t.started)
    assert [t.status for t in trials] == ["DONE"] * 3
    head_starts = [t.last_result["worker_head_start_s"] for t in trials]
    # the second and third trials' workers were started (and imported the stack) while the trial before trained
    assert all(h > 1.0 for h in head_starts[1:]), head_starts
    # the trial runs are created by rank 0 inside the workers now: one nested run per trial, closed with its adapter
    client = tracking.client(config.tracking.tracking_uri)
    for t in trials:
        run = client.get_run(t.run_id)
        assert run.info.status == "FINISHED" and run.data.tags["loraforge.trial_status"] == "DONE"
        assert run.data.params["sampled.train.seed"] == str(t.sampled["train.seed"])
