"""B2: per-trial orchestration overhead = trial wall time - its training-loop time.

Runs the same N short trials of the real pipeline (Tune trainable -> TorchTrainer, 1 worker,
MLflow) twice in one run, each on a fresh local Ray instance: Ray's on-demand worker
processes (`ray.warm_workers: false`, the default Tune + Train pattern) and loraforge's warm
pool (`pipeline/warmpool.py`). Reports median / max overhead per arm and the ratio, plus
each arm's whole-sweep wall time (the warm pool moves process start-up off the trial's path;
it does not make the imports free). Prints; asserts nothing.

    python bench/b2_trial_overhead.py [--trials 4] [--steps 20] [--concurrency 1]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _common import dump, experiment, median

from pipeline.config import load_config
from pipeline.run import run_pipeline


def arm(tmp: Path, args: argparse.Namespace, warm: bool) -> dict:
    import ray
    import yaml

    raw = experiment(tmp, train_rows=args.steps * 32, eval_rows=64, steps_between_evals=args.steps,
                     name=f"b2-{'warm' if warm else 'cold'}", parameters={"train.seed": {"grid": list(range(args.trials))}})
    raw["sweep"]["max_concurrent_trials"] = args.concurrency
    raw["ray"]["warm_workers"] = warm
    (tmp / "c.yaml").write_text(yaml.safe_dump(raw))
    config = load_config(tmp / "c.yaml", env={})
    started = time.perf_counter()
    result = run_pipeline(config)
    sweep_s = result.sweep.wall_s
    total = time.perf_counter() - started
    ray.shutdown()
    trials = sorted(result.sweep.trials, key=lambda t: t.started)
    return {
        "overheads_s": [t.wall_s - t.last_result["train_time_s"] for t in trials],
        "train_times_s": [t.last_result["train_time_s"] for t in trials],
        "head_starts_s": [t.last_result.get("worker_head_start_s", float("nan")) for t in trials],
        "sweep_s": sweep_s, "pipeline_s": total,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=1)
    args = parser.parse_args()
    results = {}
    for warm in (False, True):
        with tempfile.TemporaryDirectory() as tmp_dir:
            results["warm" if warm else "cold"] = arm(Path(tmp_dir), args, warm)
    print(f"\nB2 per-trial overhead, {args.trials} trials x {args.steps} steps, {args.concurrency} at a time, same run")
    for name, r in results.items():
        print(f"  {name}: overhead per trial (in start order) " + ", ".join(f"{o:.1f}" for o in r["overheads_s"])
              + f" s; median {median(r['overheads_s']):.1f} s, max {max(r['overheads_s']):.1f} s")
        print(f"        train loop median {median(r['train_times_s']):.1f} s; worker started before its trial by "
              + ", ".join(f"{h:.1f}" for h in r["head_starts_s"]) + " s")
        print(f"        sweep wall {r['sweep_s']:.1f} s, whole pipeline incl. Ray start, registry, eval {r['pipeline_s']:.1f} s")
    cold, warm = results["cold"], results["warm"]
    print(f"  median overhead warm / cold: {median(warm['overheads_s']) / median(cold['overheads_s']):.2f}; "
          f"sweep wall warm / cold: {warm['sweep_s'] / cold['sweep_s']:.2f}")
    dump("b2", results)


if __name__ == "__main__":
    main()
