"""Ctrl-C and SIGTERM are interrupts, never a finished sweep: real signals to a `loraforge run` driver.

SIGTERM mid-sweep (what `loraforge jobs stop` and Kubernetes send): exit 143, the parent and the running
trial KILLED in MLflow, nothing registered, no evaluation, the `--resume` command printed. `--resume`
then gets SIGINT (Ctrl-C) mid-sweep: exit 130, the same. A last `--resume` finishes and registers once.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from pipeline import tracking
from tests.support.configs import minilm_config, write_yaml
from tests.support.ray_cluster import stop_every_ray
from tests.support.driver import loraforge_run as cli, trial_runs

pytestmark = pytest.mark.slow


def interrupt_after_a_new_checkpoint(args: list[str], cwd: Path, storage: Path, signum: int) -> tuple[int, str, float]:
    """Start the driver, wait for a checkpoint it writes, send `signum` to it alone; (exit code, output, seconds to exit)."""
    before = set(storage.glob("*/train/train-*/checkpoint_*/MANIFEST.rank0.json"))
    driver = cli(*args, cwd=cwd)
    deadline = time.time() + 300
    while time.time() < deadline and driver.poll() is None:
        if set(storage.glob("*/train/train-*/checkpoint_*/MANIFEST.rank0.json")) - before:
            break
        time.sleep(0.1)
    assert driver.poll() is None, "the driver ended before it wrote a checkpoint:\n" + driver.communicate()[0][-3000:]
    sent = time.time()
    driver.send_signal(signum)
    output, _ = driver.communicate(timeout=120)
    return driver.returncode, output, time.time() - sent


def assert_interrupted(output: str, uri: str, signame: str, config_path: Path) -> None:
    client = tracking.client(uri)
    experiment = client.get_experiment_by_name("tests")
    parents = client.search_runs([experiment.experiment_id], "tags.`loraforge.kind` = 'sweep'")
    assert [p.info.status for p in parents] == ["KILLED"], [(p.info.run_name, p.info.status) for p in parents]
    assert parents[0].data.tags["loraforge.interrupted_by"] == signame
    trials = trial_runs(uri, "tests")
    assert trials and all(r.info.status in ("KILLED", "FINISHED") for r in trials)
    assert any(r.data.tags.get("loraforge.trial_status") == "INTERRUPTED" and r.info.status == "KILLED" for r in trials)
    assert client.search_model_versions("name = 'test-sst2-lora'") == []  # nothing registered
    assert "registered:" not in output and "eval_report" not in output
    assert f"interrupted by {signame}" in output and f"loraforge run {config_path} --resume" in output


def test_sigterm_then_ctrl_c_mark_the_sweep_killed_and_resume_finishes_and_registers_once(tmp_path: Path, sst2_small):
    raw = minilm_config(tmp_path, sst2_small, train={"epochs": 2, "eval_every_steps": 2})
    raw["sweep"] = {"searcher": "grid", "scheduler": "fifo", "pack_size": 1, "parameters": {"lora.r": {"grid": [4]}}}
    path = write_yaml(tmp_path / "c.yaml", raw)
    uri, storage = raw["tracking"]["tracking_uri"], Path(raw["ray"]["storage_path"])
    assert raw["tracking"]["registered_model_name"] == "test-sst2-lora"

    code, output, took = interrupt_after_a_new_checkpoint([str(path)], tmp_path, storage, signal.SIGTERM)
    assert code == 143, output[-3000:]
    assert took < 60, f"{took:.0f} s from SIGTERM to exit"
    assert_interrupted(output, uri, "SIGTERM", path)

    code, output, took = interrupt_after_a_new_checkpoint([str(path), "--resume"], tmp_path, storage, signal.SIGINT)
    assert code == 130, output[-3000:]  # one Ctrl-C is enough
    assert "resuming sweep" in output
    assert_interrupted(output, uri, "SIGINT", path)
    stop_every_ray()  # nothing should be left, but a stray instance must not meet the next driver

    last = cli(str(path), "--resume", cwd=tmp_path)
    output, _ = last.communicate(timeout=600)
    assert last.returncode == 0, output[-3000:]
    client = tracking.client(uri)
    versions = client.search_model_versions("name = 'test-sst2-lora'")
    assert len(versions) == 1  # registered once, by the run that finished
    trials = trial_runs(uri, "tests")
    assert len(trials) == 1 and trials[0].info.status == "FINISHED"
    assert trials[0].data.tags["loraforge.trial_status"] == "DONE"
    assert len(list(storage.glob("test-sst2*"))) == 1  # the same sweep all along
