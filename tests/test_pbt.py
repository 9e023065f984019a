"""PBT for lr through real Ray Tune + Ray Train: the worse trial continues from a copy of the better one's checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from pipeline import adapters, tracking
from pipeline.checkpoint import step_of
from pipeline.config import load_config
from pipeline.run import run_pipeline
from pipeline.sweep import PBT_ORIGIN
from tests.support.configs import minilm_config, write_yaml

pytestmark = pytest.mark.slow


def linear_factor(step: int, warmup: int, total: int) -> float:
    """transformers' linear schedule (warmup, then decay to 0) after `step` scheduler steps."""
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def test_pbt_exploit_continues_from_the_better_trials_checkpoint_with_a_new_lr(tmp_path: Path, sst2_small, ray_local):
    # 160 rows / batch 16 = 10 steps an epoch, 2 epochs, an evaluation every 2 steps: 10 reports per trial
    raw = minilm_config(tmp_path, sst2_small, train={"epochs": 2, "eval_every_steps": 2, "log_every_steps": 1},
                        # explore never redraws lr: it perturbs the copied lr by Tune's factors, 1.2 or 0.8
                        sweep={"searcher": "random", "scheduler": "pbt", "num_samples": 2,
                               "pbt": {"perturbation_interval": 2, "quantile_fraction": 0.5, "resample_probability": 0.0},
                               "parameters": {"train.lr": {"loguniform": [1e-6, 1e-2]}}})
    config = load_config(write_yaml(tmp_path / "c.yaml", raw), env={})
    result = run_pipeline(config, reports_dir=tmp_path / "reports")

    assert len(result.sweep.trials) == 2
    assert {t.status for t in result.sweep.trials} == {"DONE"}
    train_storage = Path(config.ray.storage_path) / result.sweep.run_name / "train"
    copies = sorted((train_storage / "pbt").glob("train-*-pbt*/checkpoint_*"))
    assert copies, "PBT never exploited: no checkpoint copied into a trial's next generation"

    client = tracking.client(config.tracking.tracking_uri)
    trials = {t.trial_id: t for t in result.sweep.trials}
    total = 20
    warmup = math.ceil(config.train.warmup_ratio * total)
    for copy in copies:
        recipient, generation = copy.parent.name.removeprefix("train-").rsplit("-pbt", 1)
        origin = json.loads((copy.parent / PBT_ORIGIN).read_text())
        # a copy of the other trial's checkpoint, taken at the result PBT judged it by
        assert origin["trial_id"] != recipient and origin["trial_id"] in trials
        copied_step = step_of(copy)
        assert copied_step == origin["result"]["step"] > 0
        assert adapters.read_metadata(copy)["metrics"]["eval_accuracy"] == origin["result"]["eval_accuracy"]

        # the next generation is a new Ray Train run that continued from the copy's step, not from 0
        steps = sorted(step_of(c) for c in (train_storage / copy.parent.name).glob("checkpoint_*") if c.is_dir())
        assert steps and steps[0] > copied_step
        last_generation = max(int(c.parent.name.rsplit("-pbt", 1)[1]) for c in copies
                              if c.parent.name.startswith(f"train-{recipient}-pbt"))
        if int(generation) == last_generation:
            assert steps[-1] == total

        run = client.get_run(trials[recipient].run_id)
        exploit = json.loads(run.data.tags[f"loraforge.pbt.{generation}"])
        assert exploit["from_trial"] == origin["trial_id"] and exploit["step"] == copied_step
        # the new lr took over from the copied optimizer state's: logged lr = new lr x schedule, from that step on
        next_copy_step = min([step_of(c) for c in copies if c.parent.name.startswith(f"train-{recipient}-pbt")
                              and int(c.parent.name.rsplit("-pbt", 1)[1]) > int(generation)], default=total)
        # generations overlap in steps (a copy can be older than where the trial had got to): newest wins
        logged = {m.step: m.value for m in sorted(client.get_metric_history(run.info.run_id, "lr"),
                                                  key=lambda m: m.timestamp)}
        after = [s for s in logged if copied_step < s <= next_copy_step]
        assert after
        copied_lr = origin["result"]["lr"] / linear_factor(copied_step, warmup, total)  # what the copied state ran with
        assert exploit["train.lr"] != pytest.approx(copied_lr, rel=1e-3)
        assert min(abs(exploit["train.lr"] / copied_lr - f) for f in (1.2, 0.8)) < 1e-6, (exploit, copied_lr)
        for s in after:
            assert logged[s] == pytest.approx(exploit["train.lr"] * linear_factor(s, warmup, total), rel=1e-6, abs=1e-12)

    # each trial's summary carries the config it ended with: the last generation's lr
    for trial_id, trial in trials.items():
        run = client.get_run(trial.run_id)
        if generation := run.data.tags.get("loraforge.pbt_generation"):
            assert trial.sampled["train.lr"] == json.loads(run.data.tags[f"loraforge.pbt.{generation}"])["train.lr"]
    assert result.sweep.best.best_metric is not None and result.sweep.best.best_checkpoint
