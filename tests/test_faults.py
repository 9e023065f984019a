"""Runtime faults injected into real pipeline runs (../shared/reference faults F1, F2, F5, F9, F16, F17).

Faults come from outside the product: a test thread SIGKILLs a Ray Train worker
process, fills the filesystem the workers write checkpoints to, or (F16) a Ray
`worker_process_setup_hook` multiplies one rank's loss by NaN. Outcomes are checked on
storage contents, reported metrics and MLflow, never on log text alone.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file

from pipeline import checkpoint as ckpt
from pipeline import tracking
from pipeline.config import load_config
from pipeline.run import run_pipeline
from pipeline.sweep import SweepError
from tests.support.configs import minilm_config, write_yaml

pytestmark = pytest.mark.slow


@pytest.fixture()
def start_ray():
    import ray

    from tests.support.ray_cluster import start_local_ray

    yield lambda **env: start_local_ray(hooks=True, **env)
    ray.shutdown()


def experiment(tmp: Path, sst2, name: str, strategy: dict | None = None, **train) -> object:
    tmp.mkdir(parents=True, exist_ok=True)
    raw = minilm_config(tmp, sst2, train={"num_workers": 2, "epochs": 3, "eval_every_steps": 2, **train})
    raw["name"] = name
    raw["strategy"] = strategy or {"kind": "lora"}
    raw["tracking"]["registered_model_name"] = f"{name}-lora"
    return load_config(write_yaml(tmp / f"{name}.yaml", raw), env={})


def checkpoints(config) -> list[Path]:
    """Complete checkpoints on storage (rank 0's manifest is written last), oldest step first."""
    found = [p.parent for p in config.ray.storage_path.glob("*/train/train-*/checkpoint_*/MANIFEST.rank0.json")]
    return sorted(found, key=ckpt.step_of)


def registered_checkpoints(config) -> list[str]:
    """Checkpoints Ray Train has registered: every rank reported it and the controller wrote its snapshot.

    Files on storage are not enough. Ranks upload their parts before the controller has heard
    from all of them, and a worker killed in between leaves a checkpoint Ray never counts.
    """
    names = []
    for snapshot in config.ray.storage_path.glob("*/train/train-*/checkpoint_manager_snapshot.json"):
        try:
            state = json.loads(snapshot.read_text())
        except (OSError, ValueError):
            continue  # being rewritten
        names += [r["checkpoint_dir_name"] for r in state.get("checkpoint_results", [])]
    return names


def when_checkpointed(config, action: Callable[[], None], timeout: float = 300) -> threading.Thread:
    """Run `action` from a side thread as soon as the trial has committed its first checkpoint."""
    def watch() -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if registered_checkpoints(config):
                action()
                return
            time.sleep(0.02)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def kill_a_worker(record: dict) -> None:
    from ray.util.state import list_actors

    workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    record["pid"] = workers[0].pid
    os.kill(workers[0].pid, signal.SIGKILL)


def trial_run(config):
    client = tracking.client(config.tracking.tracking_uri)
    experiment_id = client.get_experiment_by_name(config.tracking.experiment_name).experiment_id
    runs = client.search_runs([experiment_id], "tags.`loraforge.trial_id` != ''")
    assert len(runs) == 1
    return client, runs[0]


def registered_versions(config) -> list:
    client = tracking.client(config.tracking.tracking_uri)
    return client.search_model_versions(f"name = '{config.tracking.registered_model_name}'")


def test_f1_killed_worker_resumes_from_its_checkpoint_and_matches_an_uninterrupted_run(tmp_path: Path, sst2_small, start_ray):
    """ZeRO-3, 2 workers: a worker SIGKILLed mid-epoch restarts the group from the last checkpoint."""
    start_ray()
    strategy = {"kind": "zero3_offload"}
    # 2 epochs of 5 steps per worker (160 rows, batch 16, 2 workers): 10 steps, a checkpoint every 2
    golden = experiment(tmp_path / "golden", sst2_small, "golden", strategy, max_failures=2, epochs=2)
    faulty = experiment(tmp_path / "faulty", sst2_small, "faulty", strategy, max_failures=2, epochs=2)

    clean = run_pipeline(golden)
    record: dict = {}
    watcher = when_checkpointed(faulty, lambda: kill_a_worker(record))
    resumed = run_pipeline(faulty)
    watcher.join(5)
    assert record.get("pid"), "the worker was never killed"

    trial = resumed.sweep.trials[0]
    assert trial.status == "DONE" and not trial.error
    client, run = trial_run(faulty)
    assert run.data.tags["loraforge.worker_restarts"] == "1"  # one failure, counted once
    resumed_from = int(run.data.tags["loraforge.resumed_from_step"])
    assert 2 <= resumed_from < 10  # mid-run, from a committed checkpoint, not from scratch
    assert trial.last_result["worker_restarts"] == 1 and trial.last_result["step"] == 10

    # same final metric and same adapter as the run nobody interrupted (CPU, fp32: exact up to float noise)
    assert trial.last_result["eval_accuracy"] == clean.sweep.trials[0].last_result["eval_accuracy"]
    final_clean, final_resumed = checkpoints(golden)[-1], checkpoints(faulty)[-1]
    assert ckpt.step_of(final_clean) == ckpt.step_of(final_resumed) == 10
    a, b = (load_file(str(d / "adapter_model.safetensors")) for d in (final_clean, final_resumed))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)
    assert ckpt.verify(Path(trial.best_checkpoint)) == []
    assert [v.status for v in registered_versions(faulty)] == ["READY"]


def test_f2_more_failures_than_allowed_fail_the_trial_and_keep_its_checkpoint(tmp_path: Path, sst2_small, start_ray):
    start_ray()
    # the run ends at the kill (no failures allowed), so a long run costs nothing and the kill, however
    # late a loaded machine lets the watcher see the first checkpoint, lands while the trial still trains
    config = experiment(tmp_path, sst2_small, "f2", max_failures=0, epochs=20)
    record: dict = {}
    watcher = when_checkpointed(config, lambda: kill_a_worker(record))
    with pytest.raises(SweepError, match="no trial reported"):
        run_pipeline(config)
    watcher.join(5)
    assert record.get("pid")
    client, run = trial_run(config)
    assert run.info.status == "FAILED"
    assert run.data.tags["loraforge.trial_status"] == "ERROR"
    # the error names the dead worker: the process this test killed
    error = run.data.tags["loraforge.error"]
    assert "The actor died unexpectedly" in error and "class_name: RayTrainWorker" in error, error[-2000:]
    assert f"pid: {record['pid']}" in error, error[-2000:]
    # the last committed checkpoint survives the failure, passes the guard and loads
    latest = checkpoints(config)[-1]
    assert ckpt.verify(latest) == []
    from pipeline.evaluate import score_adapter_dir

    from pipeline import adapters

    # it reproduces the accuracy its trial measured when it wrote it (same 64 rows, the head it carries)
    recorded = adapters.read_metadata(latest)["metrics"]["eval_accuracy"]
    assert score_adapter_dir(latest, config)["eval_accuracy"] == pytest.approx(recorded, abs=1e-9)
    assert registered_versions(config) == []  # a failed trial is never registered


def test_f16_nan_loss_stops_the_trial_within_a_step_and_nothing_after_is_kept(tmp_path: Path, sst2_small, start_ray):
    start_ray(LORAFORGE_TEST_NAN_AT="4:1")  # rank 1's 4th training forward: steps 0-2 done, fails at step 3
    config = experiment(tmp_path, sst2_small, "f16", eval_every_steps=1)
    with pytest.raises(SweepError, match=r"non-finite loss at step 3 \(rank 1\)"):
        run_pipeline(config)
    steps = [ckpt.step_of(p) for p in checkpoints(config)]
    assert steps and max(steps) <= 3  # no checkpoint after the bad step was reported
    client, run = trial_run(config)
    assert run.info.status == "FAILED"
    assert registered_versions(config) == []


def test_f17_disk_full_while_checkpointing_fails_cleanly_and_keeps_the_previous_checkpoint(tmp_path: Path, sst2_small, start_ray):
    """A real full disk (a 16 MiB tmpfs) where `mount` is allowed; else a write hook that fails mid-file with ENOSPC."""
    scratch = tmp_path / "tmpfs"
    scratch.mkdir()
    mounted = False
    if not os.environ.get("LORAFORGE_TEST_F17_HOOK"):  # set it to run the hook path where mount works
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(scratch)],
                                 capture_output=True).returncode == 0
    flag = tmp_path / "disk-full"
    try:
        # TMPDIR is where the workers stage checkpoints before reporting them; torch's inductor
        # cache would land there too and eat the small disk at its own pace, so it goes elsewhere
        env = {"TMPDIR": str(scratch), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
        start_ray(**env) if mounted else start_ray(**env, LORAFORGE_TEST_ENOSPC_FLAG=str(flag))

        def fill() -> None:
            if not mounted:
                flag.touch()
                return
            try:
                with open(scratch / "filler", "wb") as f:
                    while True:
                        f.write(b"\0" * (1 << 20))
                        f.flush()
            except OSError:
                pass

        config = experiment(tmp_path, sst2_small, "f17", num_workers=1, max_failures=0, epochs=20)  # ends at the fault
        watcher = when_checkpointed(config, fill)
        with pytest.raises(SweepError, match="disk full at"):
            run_pipeline(config)
        watcher.join(5)
        committed = checkpoints(config)
        assert committed and all(ckpt.verify(p) == [] for p in committed)  # previous checkpoint stays latest
        # the half-written staging dir was removed (tempfile names it tmp*)
        assert [p.name for p in scratch.iterdir() if p.name.startswith("tmp")] == []
        client, run = trial_run(config)
        assert run.info.status == "FAILED"
        assert registered_versions(config) == []
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(scratch)], check=False)


def _snapshot(config) -> tuple[Path, dict]:
    [path] = config.ray.storage_path.glob(f"*/train/train-*/{ckpt.TRAIN_SNAPSHOT}")
    return path, json.loads(path.read_text())


def crash_trial_and_delete_its_latest_checkpoint(config, record: dict) -> None:
    """F5 then F9: SIGKILL the processes running `trainer.fit()` (Tune's trial actor and the Train controller
    it started, so no snapshot is written after), then delete the checkpoint the snapshot names as latest."""
    import psutil
    from ray.util.state import list_actors

    deadline = time.time() + 120
    while len(registered_checkpoints(config)) < 2 and time.time() < deadline:
        time.sleep(0.02)
    alive = list_actors(filters=[("state", "=", "ALIVE")], limit=10_000)
    record["actors"] = sorted({a.class_name for a in alive})
    # by process title too: the state API has been seen to leave the trial actor out of its list
    titles = {p.pid: " ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"])}
    victims = sorted({a.pid for a in alive if a.class_name in ("TrainController", "ImplicitFunc")} |
                     {pid for pid, title in titles.items() if title.startswith(("ray::ImplicitFunc", "ray::TrainController"))})
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    psutil.wait_procs([psutil.Process(p) for p in victims if psutil.pid_exists(p)], timeout=30)
    record["pids"] = victims
    path, state = _snapshot(config)
    latest = state["latest_checkpoint_result"]["checkpoint_dir_name"]
    record["deleted"], record["deleted_step"] = latest, ckpt.step_of(path.parent / latest)
    import shutil

    shutil.rmtree(path.parent / latest)


def test_f5_f9_a_crashed_trial_driver_resumes_past_a_deleted_checkpoint_in_the_same_run(tmp_path: Path, sst2_small, start_ray):
    """F5: the trial's `trainer.fit()` process dies; Tune restarts the trial, which finds its Train run by name.
    F9: the checkpoint that run's snapshot names last is gone; Ray would refuse the run (use a new name
    or delete the folder), loraforge drops the entry and resumes from the newest checkpoint still there."""
    start_ray()
    config = experiment(tmp_path, sst2_small, "f5", num_workers=1, max_failures=1, epochs=3)
    record: dict = {}
    watcher = threading.Thread(target=crash_trial_and_delete_its_latest_checkpoint, args=(config, record), daemon=True)
    watcher.start()
    result = run_pipeline(config)
    watcher.join(30)
    assert len(record.get("pids", [])) == 2, record  # the trial actor and its Train controller

    trial = result.sweep.trials[0]
    assert trial.status == "DONE" and not trial.error
    assert trial.last_result["step"] == 30  # 3 epochs of 10 steps, finished
    client, run = trial_run(config)  # one MLflow run for the trial: the restarted driver found it again
    assert run.info.status == "FINISHED"
    assert run.data.tags["loraforge.ckpt_missing"] == record["deleted"]
    resumed_from = int(run.data.tags["loraforge.resumed_from_step"])
    assert 2 <= resumed_from < record["deleted_step"]  # the older checkpoint, not scratch
    assert record["deleted"] not in json.dumps(_snapshot(config)[1])
    assert [v.status for v in registered_versions(config)] == ["READY"]
