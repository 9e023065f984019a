"""B1: time for ASHA, and for packed successive halving, to reach the grid's best accuracy (within 0.5 pt),
as a fraction of the full grid's wall time, in several grid orders.

Same search space, same machine, one run: the grid (FIFO, one trial per config, every trial to the end),
then for each grid order ASHA over the same trials (`sweep.pack_size: 1`) and the packed sweep
(`sweep.pack_size: auto`: the 16 configs on one base, successive halving inside the pack at equal step
budgets). The orders: `listed` (Tune's order: the lr grid ascending, smallest first), `reversed` (both
grids written in reverse, largest lr first) and `shuffled` (`sweep.grid_order: shuffled`, seed 0). Times
come from the MLflow metric history (every eval's timestamp) against each sweep's start. Prints the ratios
and the trial-steps each sweep spent; asserts nothing. About 1 h 50 min on 2 cores for the three orders
(the grid alone is 16 full trials, about 24 minutes).

    python bench/b1_asha_vs_grid.py [--train-rows 2000] [--epochs 2] [--orders listed,reversed,shuffled]
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


def space(order: str) -> dict:
    if order != "reversed":
        return SPACE
    return {path: {"grid": list(reversed(domain["grid"]))} for path, domain in SPACE.items()}


def sweep(tmp: Path, name: str, scheduler: str, order: str, pack_size: int | str, args: argparse.Namespace) -> dict:
    import yaml

    raw = experiment(tmp, train_rows=args.train_rows, eval_rows=872, steps_between_evals=args.eval_every,
                     epochs=args.epochs, parameters=space(order), name=name)
    raw["sweep"].update({"scheduler": scheduler, "asha": {"grace_period": 1, "reduction_factor": 2},
                         "grid_order": "shuffled" if order == "shuffled" else "listed", "pack_size": pack_size})
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


def time_to(run: dict, target: float) -> float | None:
    return next((t for t, accuracy in run["evals"] if accuracy >= target), None)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--train-rows", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--eval-every", type=int, default=21)
    parser.add_argument("--orders", default="listed,reversed,shuffled",
                        help="comma-separated grid orders: listed, reversed, shuffled")
    args = parser.parse_args()
    orders = [o.strip() for o in args.orders.split(",") if o.strip()]
    if not orders or any(o not in ("listed", "reversed", "shuffled") for o in orders):
        parser.error(f"--orders: {args.orders!r}: give listed, reversed and/or shuffled, comma-separated")
    import ray

    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        runs["grid"] = sweep(tmp, "b1-grid", "fifo", "listed", 1, args)
        ray.shutdown()
        for order in orders:
            for arm, pack_size in (("asha", 1), ("packed", "auto")):
                run = runs[f"{arm}-{order}"] = sweep(tmp, f"b1-{arm}-{order}", "asha", order, pack_size, args)
                ray.shutdown()
                print(f"B1 {arm} ({order}): {run['wall_s']:.0f} s", flush=True)
    report(runs, args)


def report(runs: dict[str, dict], args: argparse.Namespace) -> None:
    grid = runs["grid"]
    arms = {name: run for name, run in runs.items() if name != "grid"}
    target = grid["best"] - 0.005
    reached = {name: time_to(run, target) for name, run in arms.items()}
    ratios = {name: None if t is None else t / grid["wall_s"] for name, t in reached.items()}
    dump("b1", {"runs": runs, "target": target, "ratios": ratios})  # before printing: nothing measured is lost
    print(f"\nB1 ASHA and packed successive halving vs grid: MiniLM + SST-2 ({args.train_rows} rows x {args.epochs} "
          f"epochs, an eval every {args.eval_every} steps), {2 * len(LRS)} configs (r=8, targets {{q+v, all attention}} "
          f"x lr {{{', '.join(f'{lr:g}' for lr in LRS)}}}); grid and ASHA one trial per config, 2 at a time; "
          f"packed: sweep.pack_size auto")
    print(f"  grid : {grid['wall_s']:6.0f} s wall, best {grid['best']:.4f}, {grid['trial_steps']} trial-steps; "
          f"target {target:.4f} (grid best - 0.5 pt)")
    print("  | order | arm | wall s | best | trial-steps (/ grid) | stopped early | time to target s | / grid wall |")
    for name, run in arms.items():
        arm, order = name.split("-", 1)
        print(f"  | {order} | {arm} | {run['wall_s']:.0f} | {run['best']:.4f} | {run['trial_steps']} "
              f"({run['trial_steps'] / grid['trial_steps']:.2f}) | {run['stopped']} of {run['trials']} | "
              + ("never | - |" if reached[name] is None else f"{reached[name]:.0f} | {ratios[name]:.2f} |"))
    print("  targets: packed <= 0.3 of the grid's wall time in every order")
    print("  per config, best accuracy: grid | " + " | ".join(arms))
    by_config = {name: {str(t["sampled"]): t for t in run["per_trial"]} for name, run in arms.items()}
    for t in sorted(grid["per_trial"], key=lambda t: -(t["best"] or 0)):
        key = str(t["sampled"])
        others = [by_config[name].get(key, {}) for name in arms]
        cells = [f"{(other.get('best') or float('nan')):.4f} ({other.get('status')})" for other in others]
        print(f"    {key}: {t['best'] or float('nan'):.4f} | " + " | ".join(cells))

if __name__ == "__main__":
    main()
