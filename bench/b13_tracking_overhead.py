"""B13: tracking overhead on trial tokens/s: MLflow server (HTTP, PostgreSQL, basic auth) vs SQLite vs no tracking.

The same one-worker MiniLM trial three ways, `--repeats` rounds in alternating order (medians and spread):
through `loraforge run` against a local `mlflow server` on PostgreSQL as a non-admin user, through
`loraforge run` against the embedded SQLite store, and as a bare Ray Train run of the same worker
function with no MLflow at all. tokens/s is the worker's wall-clock figure (`wall_tokens_per_s`: tokens
over `loop_wall_s`, from the first batch to the last checkpoint, so step logging, the synchronous
flush at every evaluation, the checkpoints and the reports to Tune are all inside the clock; up to
ab23a2b B13 timed the training steps alone, leaving the flushes out). The steps-only figure is printed
beside it. Prints the ratios to no tracking; asserts nothing. Needs PostgreSQL's initdb on PATH.

    python bench/b13_tracking_overhead.py [--steps 120] [--eval-every 20] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
from pathlib import Path

from _common import REPO, dump, experiment, median, spread

from pipeline.config import load_config
from pipeline.run import run_pipeline


def untracked(config, storage: Path) -> dict:
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipeline.train import train_fn_per_worker

    trainer = TorchTrainer(
        train_fn_per_worker, train_loop_config={"experiment": config.model_dump(mode="json")},
        scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": config.train.cpus_per_worker}),
        run_config=ray.train.RunConfig(name="b13-untracked", storage_path=str(storage)))
    return trainer.fit().metrics


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3, help="rounds of the three runs (medians reported)")
    args = parser.parse_args()
    import sys

    import yaml

    sys.path.insert(0, str(REPO))
    from tests.support.mlflow_service import MlflowServer, Postgres, env

    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        raw = experiment(tmp, train_rows=args.steps * 32, eval_rows=64, steps_between_evals=args.eval_every, name="b13")
        raw["eval"] = {"suites": []}  # the benchmark stage after the sweep is outside the clock
        raw["tracking"]["system_metrics_interval_s"] = 10
        (tmp / "sqlite.yaml").write_text(yaml.safe_dump(raw))
        pg_root = Path(tempfile.mkdtemp(prefix="loraforge-pg-"))
        pg_root.chmod(0o755)
        postgres = Postgres(pg_root / "pg").start()
        server = MlflowServer(postgres, tmp / "server").start()
        try:
            server.create_user("bench", "bench-password-1")
            raw["tracking"]["tracking_uri"] = server.uri
            (tmp / "http.yaml").write_text(yaml.safe_dump(raw))
            runs: dict[str, list[float]] = {"http_postgres": [], "sqlite": [], "untracked": []}
            steps_only: dict[str, list[float]] = {name: [] for name in runs}
            for round_ in range(args.repeats):  # rounds in alternating order, so drift hits every store alike
                order = list(runs) if round_ % 2 == 0 else list(reversed(runs))
                for name in order:
                    if name == "http_postgres":
                        with env({"MLFLOW_TRACKING_USERNAME": "bench", "MLFLOW_TRACKING_PASSWORD": "bench-password-1"}):
                            last = run_pipeline(load_config(tmp / "http.yaml", env={})).sweep.best.last_result
                        os.environ.pop("LORAFORGE_MLFLOW_OUTBOX", None)
                    elif name == "sqlite":
                        last = run_pipeline(load_config(tmp / "sqlite.yaml", env={})).sweep.best.last_result
                    else:
                        last = untracked(load_config(tmp / "sqlite.yaml", env={}), tmp / f"untracked-{round_}")
                    runs[name].append(last["wall_tokens_per_s"])
                    steps_only[name].append(last["tokens_per_s"])
            figures = {name: statistics.median(values) for name, values in runs.items()}
        finally:
            server.kill()
            postgres.stop()
            shutil.rmtree(pg_root, ignore_errors=True)
    print(f"\nB13 tracking overhead, MiniLM + LoRA r=8 q,v, batch 32, 1 worker x 1 thread, {args.steps} steps, "
          f"an evaluation and a checkpoint every {args.eval_every}, {args.repeats} alternating rounds")
    print("  wall clock, first batch to last checkpoint:")
    for name, label in (("untracked", "no tracking"), ("sqlite", "SQLite store"), ("http_postgres", "HTTP + PostgreSQL")):
        print(f"    {label:18s}: {spread(runs[name], '.0f')} tokens/s   ratio to no tracking "
              f"{figures[name] / figures['untracked']:.3f}")
    print("  target: >= 0.97 of no tracking")
    print("  the training steps alone (what B13 timed before): " + ", ".join(
        f"{name} {median(steps_only[name]):.0f}" for name in runs) + " tokens/s")
    dump("b13", {**figures, "runs": runs, "steps_only": steps_only, "steps": args.steps, "eval_every": args.eval_every,
                 "ratio_sqlite": figures["sqlite"] / figures["untracked"],
                 "ratio_http_postgres": figures["http_postgres"] / figures["untracked"]})


if __name__ == "__main__":
    main()
