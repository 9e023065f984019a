"""B14: registry round trip ÷ trial time: register the winner as an MLflow Model, point an alias at it, load it via pyfunc.

One real one-trial MiniLM sweep on the embedded SQLite store, then the round trip again on its
winner, timed step by step: log the MLflow Model on the trial's run and create the version
(`register_winner`, which includes MLflow's own check that the input example serves), set the
alias, and `mlflow.pyfunc.load_model("models:/NAME@alias")` plus one predict. Prints the
ratio to the trial's wall time; asserts nothing.

    python bench/b14_registry_round_trip.py [--steps 60]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _common import dump, experiment

from pipeline import preflight, tracking
from pipeline.config import load_config
from pipeline.run import register_winner, run_lineage, run_pipeline


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    import mlflow
    import pandas as pd
    import yaml

    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        raw = experiment(tmp, train_rows=args.steps * 32, eval_rows=64, steps_between_evals=args.steps, name="b14")
        raw["eval"] = {"suites": []}
        (tmp / "c.yaml").write_text(yaml.safe_dump(raw))
        config = load_config(tmp / "c.yaml", env={})
        result = run_pipeline(config)
        best = result.sweep.best
        client = tracking.client(config.tracking.tracking_uri)
        summary = preflight.DataSummary(train_rows=args.steps * 32, eval_rows=64, truncated_fraction=0.0)
        began = time.perf_counter()
        version = register_winner(config, client, result.parent_run_id, best, run_lineage(config, summary))
        registered = time.perf_counter()
        client.set_registered_model_alias(config.tracking.registered_model_name, "b14", version.version)
        aliased = time.perf_counter()
        with tracking.process_uri(config.tracking.tracking_uri):
            model = mlflow.pyfunc.load_model(f"models:/{config.tracking.registered_model_name}@b14")
            model.predict(pd.DataFrame({"sentence": ["a gripping, funny film"]}))
        loaded = time.perf_counter()
    steps = {"register_s": registered - began, "alias_s": aliased - registered, "load_predict_s": loaded - aliased}
    total = sum(steps.values())
    print(f"\nB14 registry round trip, MiniLM + LoRA r=8 q,v, SQLite store, trial of {args.steps} steps")
    for name, seconds in steps.items():
        print(f"  {name:15s}: {seconds:6.2f} s")
    print(f"  round trip     : {total:6.2f} s")
    print(f"  trial wall time: {best.wall_s:6.2f} s")
    print(f"  ratio          : {total / best.wall_s:.3f}")
    dump("b14", {**steps, "round_trip_s": total, "trial_wall_s": best.wall_s, "ratio": total / best.wall_s})


if __name__ == "__main__":
    main()
