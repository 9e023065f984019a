"""F6: the sweep driver is SIGKILLed mid-sweep; `loraforge run CONFIG --resume` finishes the same sweep.

Finished trials are not rerun, the interrupted one continues from its own checkpoints,
the trial count and the MLflow runs stay the same, and the winner is registered.

The resumed run is also a whole `loraforge run` with its own local Ray instance: while it runs, its
listening sockets are sampled (tests/support/sockets.py) and must be on loopback but for Ray's documented few.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from pipeline import tracking
from tests.support.configs import minilm_config, write_yaml
from tests.support.ray_cluster import stop_every_ray
from tests.support.sockets import ListenerWatch, assert_loopback_only
from tests.support.driver import loraforge_run as cli, trial_runs

pytestmark = pytest.mark.slow


def test_f6_killed_driver_resumes_without_rerunning_finished_trials(tmp_path: Path, sst2_small):
    # 10 steps a trial, a checkpoint every 2: enough for a trial to be caught between checkpoints
    raw = minilm_config(tmp_path, sst2_small, train={"epochs": 1, "eval_every_steps": 2})
    raw["name"] = "f6"
    # one trial per config: a packed sweep's kill and resume is tests/test_pack.py's
    raw["sweep"] = {"searcher": "grid", "scheduler": "fifo", "max_concurrent_trials": 1, "pack_size": 1,
                    "parameters": {"lora.r": {"grid": [2, 4, 8]}}}
    path = write_yaml(tmp_path / "c.yaml", raw)
    uri = raw["tracking"]["tracking_uri"]
    storage = Path(raw["ray"]["storage_path"])

    driver = cli(str(path), cwd=tmp_path, start_new_session=True)
    deadline = time.time() + 400
    done = []
    while time.time() < deadline and driver.poll() is None:
        done = [r for r in trial_runs(uri, "tests") if r.data.tags.get("loraforge.trial_status") == "DONE"]
        if done:
            break
        time.sleep(0.5)
    assert done and driver.poll() is None, "no trial finished before the sweep ended"
    finished_id = done[0].data.tags["loraforge.trial_id"]
    # kill while the next trial runs, after it committed a checkpoint
    running = []
    while time.time() < deadline and driver.poll() is None and not running:
        running = [p for p in storage.glob("f6/train/train-*/checkpoint_*/MANIFEST.rank0.json")
                   if finished_id not in str(p)]
        time.sleep(0.1)
    assert running and driver.poll() is None, "the second trial never checkpointed while the driver lived"
    interrupted_id = running[0].parent.parent.name.removeprefix("train-")
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    stop_every_ray()  # the killed driver's instance (and, first, any this process still has)

    finished_dir = next(storage.glob(f"f6/train/train-{finished_id}"))
    before = sorted(p.name for p in finished_dir.glob("checkpoint_*"))
    runs_before = {r.info.run_id for r in trial_runs(uri, "tests")}

    resumed = cli(str(path), "--resume", cwd=tmp_path)
    with ListenerWatch(resumed.pid) as sockets:
        output, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, output[-3000:]
    assert "resuming sweep" in output and "f6: 3 trials" in output

    # the finished trial was not rerun: same checkpoints, same MLflow run
    assert sorted(p.name for p in finished_dir.glob("checkpoint_*")) == before
    runs = trial_runs(uri, "tests")
    assert len(runs) == 3 and runs_before <= {r.info.run_id for r in runs}
    assert all(r.data.tags.get("loraforge.trial_status") == "DONE" for r in runs), [
        (r.data.tags.get("loraforge.trial_id"), r.data.tags.get("loraforge.trial_status"), r.info.status) for r in runs]
    # the interrupted trial continued from its own checkpoint, not from step 0
    interrupted = next(r for r in runs if r.data.tags["loraforge.trial_id"] == interrupted_id)
    assert int(interrupted.data.tags["loraforge.resumed_from_step"]) >= 2
    assert len(list(storage.glob("f6*"))) == 1  # the same sweep, not a new one
    client = tracking.client(uri)
    parent = client.get_run(runs[0].data.tags["mlflow.parentRunId"])
    assert parent.info.status == "FINISHED"
    assert client.get_model_version_by_alias("test-sst2-lora", "candidate").run_id in {r.info.run_id for r in runs}
    # what the resumed run's local instance listened on: our servers on loopback, Ray's documented few
    assert_loopback_only(sockets.seen)
