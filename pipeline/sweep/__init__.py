"""The sweep: search space, per-trial driver function, resources, and the Tuner over them.

Ray's three layers (Train V2): `train_fn_per_worker` (pipeline.train) runs on each worker;
`run_trial` (`trial.py`) is the Tune function trainable that builds a `TorchTrainer` for one
sampled config and reports through `TuneReportCallback`; `run_sweep` (`tuner.py`) builds the
`Tuner`. Concurrency comes from the cluster's real resources (`resources.py`) so trials x
workers never oversubscribe it.

| module | one job |
|---|---|
| `space.py` | Tune domains, the finite grid and its shuffled order, the searcher |
| `resources.py` | the cluster's resources, trials that fit at once, what the sweep costs |
| `trial.py` | the Tune trainable: one Train run (or pack) per trial |
| `callback.py` | the driver's callback: best checkpoints, trial runs closed with their adapter |
| `checkpoints.py` | a trial's Train runs on storage (PBT generations) and its best complete checkpoint |
| `schedulers.py` | ASHA, median, FIFO, and PBT through checkpoint copies |
| `resume.py` | the run state, unique run names, the newest restorable sweep |
| `results.py` | trial summaries and the sweep's result |
| `tuner.py` | `run_sweep`: the Tuner, fresh or restored |
| `planner.py` | packed sweeps: grouping configs that share a base, the memory planner |
| `report.py` | the sweep's table, report and plots |
"""

from pipeline.sweep.callback import TrialRunCallback, _restored_callback
from pipeline.sweep.checkpoints import PBT_ORIGIN, best_complete_checkpoint, train_run_dir, trial_run_path
from pipeline.sweep.resources import (TRIAL_ACTOR_RESOURCES, Resources, cluster_resources, plan_concurrency,
                                      reports_per_trial, workload)
from pipeline.sweep.results import SweepError, SweepResult, TrialSummary
from pipeline.sweep.resume import RUN_STATE, find_resumable, read_run_state, unique_run_name, write_run_state
from pipeline.sweep.schedulers import make_pbt, make_scheduler
from pipeline.sweep.space import PACK_KEY, candidate_configs, grid_points, make_search_alg, shuffled_grid, tune_domain
from pipeline.sweep.trial import run_trial
from pipeline.sweep.tuner import run_sweep

# `_restored_callback` and `run_trial` are also what sweep state written before the split names by
# `pipeline.sweep.<name>` (Tune's tuner.pkl): keep them importable here
__all__ = [
    "PACK_KEY", "PBT_ORIGIN", "RUN_STATE", "TRIAL_ACTOR_RESOURCES", "Resources", "SweepError", "SweepResult",
    "TrialRunCallback", "TrialSummary", "_restored_callback", "best_complete_checkpoint", "candidate_configs",
    "cluster_resources", "find_resumable", "grid_points", "make_pbt", "make_scheduler", "make_search_alg",
    "plan_concurrency", "read_run_state", "reports_per_trial", "run_sweep", "run_trial", "shuffled_grid",
    "train_run_dir", "trial_run_path", "tune_domain", "unique_run_name", "workload", "write_run_state",
]
