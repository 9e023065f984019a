"""B2: per-trial orchestration overhead = trial wall time − its training-loop time.

Runs N short trials of the real pipeline (Tune trainable → TorchTrainer, 1 worker, MLflow)
and reports median / max overhead and overhead ÷ training time; the same trials' training
loop alone is the denominator. Prints; asserts nothing.

    python bench/b2_trial_overhead.py [--trials 4] [--steps 20]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _common import dump, experiment, median

from pipeline.config import load_config
from pipeline.run import run_pipeline


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    import yaml

    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        seeds = list(range(args.trials))
        raw = experiment(tmp, train_rows=args.steps * 32, eval_rows=64, steps_between_evals=args.steps, name="b2",
                         parameters={"train.seed": {"grid": seeds}})
        (tmp / "c.yaml").write_text(yaml.safe_dump(raw))
        config = load_config(tmp / "c.yaml", env={})
        started = time.perf_counter()
        result = run_pipeline(config)
        total = time.perf_counter() - started
    trials = result.sweep.trials
    overheads = [t.wall_s - t.last_result["train_time_s"] for t in trials]
    train_times = [t.last_result["train_time_s"] for t in trials]
    print(f"\nB2 per-trial overhead, {len(trials)} trials x {args.steps} steps, 2 at a time on this machine")
    for t, o in zip(trials, overheads):
        print(f"  {t.trial_name}: wall {t.wall_s:6.1f} s, train loop {t.last_result['train_time_s']:6.1f} s, overhead {o:5.1f} s")
    print(f"  overhead median {median(overheads):.1f} s, max {max(overheads):.1f} s")
    print(f"  overhead / train time (median): {median([o / t for o, t in zip(overheads, train_times)]):.2f}")
    print(f"  whole pipeline incl. Ray start, registry, eval: {total:.1f} s")
    dump("b2", {"overheads_s": overheads, "train_times_s": train_times, "pipeline_s": total})


if __name__ == "__main__":
    main()
