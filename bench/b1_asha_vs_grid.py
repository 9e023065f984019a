"""B1: time for ASHA to reach the grid's best accuracy (within 0.5 pt), as a fraction of the full grid's wall time.

Same search space, same machine, one run: the grid (FIFO, every trial to the end), then
ASHA over the same trials, both in the same shuffled order (`sweep.grid_order: shuffled`). Times come from the MLflow metric history (every eval's
timestamp) against each sweep's start. Prints the ratio and the trial-steps each sweep
spent; asserts nothing. About 30 minutes on 2 cores (the grid alone is 16 full trials).

    python bench/b1_asha_vs_grid.py [--train-rows 2000] [--epochs 2] [--order shuffled|listed]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _common import dump, experiment

from pipeline import tracking
from pipeline.config import load_config
from pipeline.run import run_pipeline

# what an lr x targets sweep looks like in practice: a log grid of learning rates of which some are
# too small for a short run and some too large, the case early stopping is for (rank is nearly
# free, see the rank study)
LRS = [1.0e-4, 2.0e-4, 5.0e-4, 1.0e-3, 2.0e-3, 5.0e-3, 1.0e-2, 2.0e-2]
SPACE = {
    "lora.target_modules": {"grid": ["attention_qv", "attention_all"]},
    "train.lr": {"grid": LRS},
}


def sweep(tmp: Path, name: str, scheduler: str, args: argparse.Namespace) -> dict:
    import yaml

    raw = experiment(tmp, train_rows=args.train_rows, eval_rows=872, steps_between_evals=args.eval_every,
                     epochs=args.epochs, parameters=SPACE, name=name)
    raw["sweep"].update({"scheduler": scheduler, "asha": {"grace_period": 1, "reduction_factor": 2},
                         "grid_order": args.order})
    raw["train"]["warmup_ratio"] = 0.1
    (tmp / f"{name}.yaml").write_text(yaml.safe_dump(raw))
    config = load_config(tmp / f"{name}.yaml", env={})
    result = run_pipeline(config, reports_dir=tmp / f"{name}-reports")
    client = tracking.client(config.tracking.tracking_uri)
    start = client.get_run(result.parent_run_id).info.start_time / 1000
    evals = []  # (seconds since the sweep started, accuracy)
    steps = 0
    for trial in result.sweep.trials:
        if trial.run_id:
            history = client.get_metric_history(trial.run_id, "eval_accuracy")
            evals += [(m.timestamp / 1000 - start, m.value) for m in history]
            steps += max((m.step for m in history), default=0)
    return {"wall_s": result.sweep.wall_s, "best": result.sweep.best.best_metric, "evals": sorted(evals),
            "trial_steps": steps, "trials": len(result.sweep.trials),
            "per_trial": [{"sampled": t.sampled, "best": t.best_metric, "status": t.status} for t in result.sweep.trials],
            "stopped": sum(t.status == "STOPPED" for t in result.sweep.trials)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--train-rows", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--eval-every", type=int, default=21)
    parser.add_argument("--order", choices=["shuffled", "listed"], default="shuffled")
    args = parser.parse_args()
    import ray

    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        grid = sweep(tmp, "b1-grid", "fifo", args)
        ray.shutdown()
        asha = sweep(tmp, "b1-asha", "asha", args)
    target = grid["best"] - 0.005
    reached = next((t for t, accuracy in asha["evals"] if accuracy >= target), None)
    print(f"\nB1 ASHA vs grid: MiniLM + SST-2 ({args.train_rows} rows x {args.epochs} epochs, an eval every "
          f"{args.eval_every} steps), {2 * len(LRS)} configs (r=8, targets {{q+v, all attention}} x lr "
          f"{{{', '.join(f'{lr:g}' for lr in LRS)}}}), 2 trials at a time, grid order {args.order}")
    print(f"  grid : {grid['wall_s']:6.0f} s wall, best {grid['best']:.4f}, {grid['trial_steps']} trial-steps")
    print(f"  asha : {asha['wall_s']:6.0f} s wall, best {asha['best']:.4f}, {asha['trial_steps']} trial-steps, "
          f"{asha['stopped']} of {asha['trials']} trials stopped early")
    if reached is None:
        print(f"  ASHA never reached {target:.4f} (grid best - 0.5 pt)")
        ratio = None
    else:
        ratio = reached / grid["wall_s"]
        print(f"  ASHA reached {target:.4f} (grid best - 0.5 pt) after {reached:.0f} s: "
              f"{ratio:.2f} of the grid's wall time (target <= 0.5)")
    print(f"  trial-steps ASHA / grid: {asha['trial_steps'] / grid['trial_steps']:.2f}")
    asha_by_config = {str(t["sampled"]): t for t in asha["per_trial"]}
    print("  per config, best accuracy: grid | asha (status)")
    for t in sorted(grid["per_trial"], key=lambda t: -(t["best"] or 0)):
        other = asha_by_config.get(str(t["sampled"]), {})
        print(f"    {t['sampled']}: {t['best'] or float('nan'):.4f} | {other.get('best') or float('nan'):.4f} "
              f"({other.get('status')})")
    dump("b1", {"grid": grid, "asha": asha, "target": target, "asha_time_to_target_s": reached, "ratio": ratio})


if __name__ == "__main__":
    main()
