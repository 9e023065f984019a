"""Tune's schedulers for `sweep.scheduler`: ASHA, the median rule, FIFO, and PBT over checkpoint copies."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.sweep.checkpoints import PBT_DIR, PBT_ORIGIN, complete, pbt_generation, train_run_dir
from pipeline.sweep.space import param_key, tune_domain


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

    from ray.train import Checkpoint
    from ray.tune.schedulers import PopulationBasedTraining

    lr = sweep.parameters["train.lr"]
    mutation = lr.values() if lr.kind in ("grid", "choice") else tune_domain(lr, "random")
    pbt_root = train_storage_path / PBT_DIR

    def copy_checkpoint(source: Path, destination: Path, origin: dict[str, Any]) -> Path | None:
        if not source.is_dir() or not complete(source):
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
            generation = pbt_generation(current.name) + 1
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
        hyperparam_mutations={param_key("train.lr"): mutation}, quantile_fraction=sweep.pbt.quantile_fraction,
        resample_probability=sweep.pbt.resample_probability,
    )


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
