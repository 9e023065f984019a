"""B15: a sweep submitted to a 2-node Ray cluster vs the same sweep on the local instance, in one run.

Both arms run the same config from the command line: `loraforge run` (a local Ray instance), and
`loraforge submit` to a 2-node cluster on loopback (`ray start --head` with 2 CPUs, one for the
job driver, plus a worker node with 1; token auth on), followed with `loraforge jobs logs --follow`.
Reported per arm:
  - time from the command's start to the first trial's first logged step (MLflow's timestamp of
    the first `train_loss`);
  - per-trial overhead: the trial's wall time (Tune start to end) minus its training-loop time.
Prints; asserts nothing.

    python bench/b15_cluster.py [--trials 4] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

from _common import REPO, dump, experiment, median

from tests.support.ray_cluster import BIN, LocalCluster


def measure(tmp: Path, started: float) -> dict:
    import yaml

    from pipeline import tracking

    client = tracking.client(f"sqlite:///{tmp / 'mlruns.db'}")
    exp = client.get_experiment_by_name(yaml.safe_load((tmp / "c.yaml").read_text())["tracking"]["experiment_name"])
    trials = client.search_runs([exp.experiment_id], "tags.`loraforge.kind` = 'trial'")
    first_step = min(m.timestamp for t in trials for m in client.get_metric_history(t.info.run_id, "train_loss")) / 1000
    overheads = []
    for trial in trials:
        trial_id = trial.data.tags["loraforge.trial_id"]
        result = next((tmp / "results").glob(f"*/trial_{trial_id}/result.json"))
        last = json.loads(result.read_text().strip().splitlines()[-1])
        overheads.append(trial.data.metrics["best_wall_time_s"] - last["train_time_s"])
    return {"first_step_s": first_step - started, "overheads_s": overheads, "trials": len(trials)}


def local_arm(tmp: Path, config: Path) -> dict:
    started = time.time()
    out = subprocess.run([str(BIN / "loraforge"), "run", str(config), "--reports-dir", str(tmp / "reports")],
                         cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return {**measure(tmp, started), "command_s": time.time() - started}


def cluster_arm(tmp: Path, config: Path) -> dict:
    cluster = LocalCluster(tmp / "cluster")
    try:
        cluster.start_head(num_cpus=2)
        cluster.add_worker("worker", num_cpus=1)
        cluster.wait_for_nodes(2)
        env = cluster.client_env()
        started = time.time()
        # the data lies outside the uploaded repo, on "shared storage" both nodes read
        submitted = subprocess.run([str(BIN / "loraforge"), "submit", str(config), "--address", cluster.address,
                                    "--on-cluster", "data.train_path", "--on-cluster", "data.eval_path"],
                                   cwd=REPO, env=env, capture_output=True, text=True)
        assert submitted.returncode == 0, submitted.stderr[-3000:]
        job_id = submitted.stdout.strip().splitlines()[-1]
        followed = subprocess.run([str(BIN / "loraforge"), "jobs", "logs", job_id, "--follow", "--address", cluster.address],
                                  cwd=REPO, env=env, capture_output=True, text=True)
        assert followed.returncode == 0, followed.stdout[-3000:]
        return {**measure(tmp, started), "command_s": time.time() - started}
    finally:
        cluster.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    import yaml

    results = {}
    for name, arm in (("local", local_arm), ("cluster", cluster_arm)):
        with tempfile.TemporaryDirectory(dir=REPO / "configs", prefix=".b15-") as tmp_dir:
            tmp = Path(tmp_dir)  # inside the repo: `submit` uploads only configs under the working dir
            raw = experiment(tmp, train_rows=args.steps * 32, eval_rows=64, steps_between_evals=args.steps,
                             name=f"b15-{name}", parameters={"train.seed": {"grid": list(range(args.trials))}})
            (tmp / "c.yaml").write_text(yaml.safe_dump(raw))
            results[name] = arm(tmp, tmp / "c.yaml")
    local, cluster = results["local"], results["cluster"]
    print(f"\nB15 {args.trials} trials x {args.steps} steps, 1 CPU each; local instance (2 CPUs) vs 2-node cluster "
          "(head 2 CPUs incl. the job driver's 1, worker 1), same config, one run")
    print(f"{'':28}{'local':>10}{'cluster':>10}{'ratio':>8}")
    rows = [("to first trial's first step", local["first_step_s"], cluster["first_step_s"]),
            ("per-trial overhead (median)", median(local["overheads_s"]), median(cluster["overheads_s"])),
            ("per-trial overhead (max)", max(local["overheads_s"]), max(cluster["overheads_s"])),
            ("whole command", local["command_s"], cluster["command_s"])]
    for label, a, b in rows:
        print(f"{label:28}{a:>9.1f}s{b:>9.1f}s{b / a:>8.2f}")
    dump("b15_cluster", results)


if __name__ == "__main__":
    main()
