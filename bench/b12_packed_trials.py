"""B12: packed trials vs one run per config: the quickstart's 4 configs, the same steps each.

Runs the same 4 configs (r {2, 8} x targets {q+v, all attention}, MiniLM on SST-2) twice in one
run, each arm on a fresh local Ray instance, FIFO (every config to the end, so both arms do the
same training):
- solo: `sweep.pack_size: 1`, one Ray Train run per config, 2 at a time on 2 CPUs;
- packed: `sweep.pack_size: auto`, the 4 configs in one trial on one base, its worker on both CPUs.
Reports the wall time of the whole sweep (ratio packed / solo), the copies of the base held at
once and the peak summed RSS of the train worker processes (sampled every 0.2 s), and the
orchestration overhead per config: (trial wall time - its training-loop time - its evaluation
time) / configs in the trial. Prints; asserts nothing.

    python bench/b12_packed_trials.py [--steps 120] [--eval-every 60] [--eval-rows 872]
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

from _common import dump, experiment, median

from pipeline.config import load_config
from pipeline.run import run_pipeline

SPACE = {"lora.r": {"grid": [2, 8]},
         "lora.target_modules": {"grid": [["query", "value"], ["query", "key", "value", "attention.output.dense"]]}}


class WorkerMemory:
    """Peak of the summed RSS of this machine's Ray Train worker processes, and the most alive at once."""

    def __init__(self) -> None:
        self.peak_bytes, self.most_workers, self._stop = 0, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            total, workers = 0, 0
            for proc in psutil.process_iter(["cmdline", "memory_info"]):
                cmd = " ".join(proc.info["cmdline"] or [])
                if "RayTrainWorker" in cmd and proc.info["memory_info"] is not None:
                    rss = proc.info["memory_info"].rss
                    # an idle warm-pool process holds no model: count workers that loaded one (> 600 MiB)
                    if rss > 600 * 2**20:
                        total, workers = total + rss, workers + 1
            self.peak_bytes, self.most_workers = max(self.peak_bytes, total), max(self.most_workers, workers)
            time.sleep(0.2)

    def __enter__(self) -> "WorkerMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def arm(tmp: Path, args: argparse.Namespace, pack_size: int | str) -> dict:
    import ray
    import yaml

    name = f"b12-{'packed' if pack_size != 1 else 'solo'}"
    raw = experiment(tmp, train_rows=args.steps * 32, eval_rows=args.eval_rows, steps_between_evals=args.eval_every,
                     parameters=SPACE, name=name)
    raw["lora"]["dropout"] = 0.05
    raw["train"].update({"lr": 2e-3, "warmup_ratio": 0.1})
    raw["sweep"].update({"pack_size": pack_size})
    raw["eval"] = {"suites": []}
    (tmp / f"{name}.yaml").write_text(yaml.safe_dump(raw))
    config = load_config(tmp / f"{name}.yaml", env={})
    started = time.perf_counter()
    with WorkerMemory() as memory:
        result = run_pipeline(config, reports_dir=tmp / f"{name}-reports")
    wall = time.perf_counter() - started
    ray.shutdown()
    trials = result.sweep.trials
    groups: dict[str, list] = {}
    for t in trials:
        groups.setdefault(t.pack or t.trial_id, []).append(t)
    overheads, evals = [], []
    for members in groups.values():
        trial_wall = max(t.wall_s for t in members)
        last = members[0].last_result
        overheads += [(trial_wall - last["train_time_s"] - last["eval_time_s"]) / len(members)] * len(members)
        evals.append(last["eval_time_s"])
    return {"sweep_wall_s": result.sweep.wall_s, "pipeline_wall_s": wall, "overheads_s": overheads,
            "eval_s": sum(evals),
            "peak_worker_rss_gib": memory.peak_bytes / 2**30, "base_copies": memory.most_workers,
            "steps": [t.last_result.get("step") for t in trials], "best": result.sweep.best.best_metric,
            "accuracies": {str(t.sampled): t.best_metric for t in trials}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--eval-every", type=int, default=60)
    parser.add_argument("--eval-rows", type=int, default=872)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_dir:
        for name in ("solo", "packed"):
            (Path(tmp_dir) / name).mkdir()
        solo = arm(Path(tmp_dir) / "solo", args, 1)
        packed = arm(Path(tmp_dir) / "packed", args, "auto")
    print(f"\nB12 packed vs one run per config: 4 configs (r {{2, 8}} x {{q+v, all attention}}), {args.steps} steps "
          f"each, an eval of {args.eval_rows} rows every {args.eval_every} steps, 2 CPUs, same run")
    for name, r in (("solo  ", solo), ("packed", packed)):
        print(f"  {name}: sweep {r['sweep_wall_s']:.0f} s (pipeline {r['pipeline_wall_s']:.0f} s); steps {r['steps']}; "
              f"base copies at once {r['base_copies']}, peak worker RSS {r['peak_worker_rss_gib']:.2f} GiB; "
              f"overhead per config median {median(r['overheads_s']):.1f} s, max {max(r['overheads_s']):.1f} s; "
              f"evaluations {r['eval_s']:.0f} s in all; best {r['best']:.4f}")
    print(f"  wall time packed / solo: {packed['sweep_wall_s'] / solo['sweep_wall_s']:.2f} (target <= 0.8)")
    print(f"  peak worker RSS packed / solo: {packed['peak_worker_rss_gib'] / solo['peak_worker_rss_gib']:.2f}")
    print(f"  overhead per config packed: {median(packed['overheads_s']):.1f} s (target <= 3 s), "
          f"solo {median(solo['overheads_s']):.1f} s")
    dump("b12", {"solo": solo, "packed": packed, "args": vars(args)})


if __name__ == "__main__":
    main()
