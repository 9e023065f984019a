"""A DeepSpeed op build killed mid-way leaves its file lock; no later ZeRO-3 run waits on it unbounded.

torch's FileBaton waits forever on `<extensions>/<op>/lock`; one CI run sat 19 minutes so.
`pipeline.oplocks` removes a lock no process holds and bounds the wait on one a live process holds.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import oplocks
from tests.support.configs import REPO, minilm_config, write_yaml

HOLD = "import sys, time; f = open(sys.argv[1], 'w'); print('held', flush=True); time.sleep(600)"


def hold(lock: Path) -> subprocess.Popen:
    """A process with the lock open, as a build in progress has it (and a dead one has not)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_lock_no_process_holds_is_removed_naming_it(tmp_path: Path, caplog):
    lock = tmp_path / "cpu_adam" / "lock"
    lock.parent.mkdir()
    lock.touch()  # what a killed build leaves
    with caplog.at_level(logging.WARNING, logger="pipeline.oplocks"):
        oplocks.clear_build_locks(tmp_path, bound_s=5)
    assert not lock.exists()
    assert str(lock) in caplog.text and "stale" in caplog.text


def test_a_held_lock_is_waited_on_within_the_bound_then_named_with_its_holder(tmp_path: Path):
    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir()
    lock.touch()
    holder = hold(lock)
    try:
        start = time.monotonic()
        with pytest.raises(oplocks.OpBuildLockHeld) as err:
            oplocks.clear_build_locks(tmp_path, bound_s=1.5, poll_s=0.2)
        assert time.monotonic() - start < 10
        assert str(lock) in str(err.value) and f"pid {holder.pid}" in str(err.value)
        assert oplocks.WAIT_ENV in str(err.value)
        assert lock.exists()  # a live build's lock is never taken away
    finally:
        holder.kill()
        holder.wait()


def test_a_holder_that_dies_during_the_wait_frees_it(tmp_path: Path):
    lock = tmp_path / "cpu_adam" / "lock"
    lock.parent.mkdir()
    lock.touch()
    holder = hold(lock)
    killer = subprocess.Popen([sys.executable, "-c", f"import os, time; time.sleep(1); os.kill({holder.pid}, 9)"])
    try:
        oplocks.clear_build_locks(tmp_path, bound_s=30, poll_s=0.2)
        assert not lock.exists()
    finally:
        killer.wait()
        holder.kill()
        holder.wait()


ZERO3_CHILD = r'''
import sys
from pipeline.config import load_config
from pipeline.strategies import Worker, strategy_for

config = load_config(sys.argv[1], env={})
strategy = strategy_for(config, Worker())
strategy.wrap(strategy.load_model())
print("zero3 ready", flush=True)
'''


@pytest.mark.slow
def test_a_zero3_trial_starts_past_a_stale_build_lock_and_fails_in_bound_on_a_held_one(tmp_path: Path, sst2_small):
    """The real ops' locks (cpu_adam, shm_comm) in the real extension folder, through the real strategy."""
    raw = minilm_config(tmp_path, sst2_small, strategy={"kind": "zero3_offload"}, lora={"r": 4})
    config = write_yaml(tmp_path / "zero3.yaml", raw)
    root = oplocks.extensions_root()
    locks = [root / "cpu_adam" / "lock", root / "deepspeed_shm_comm" / "lock"]

    def child(**env: str) -> subprocess.CompletedProcess:
        environ = {**os.environ, "PYTHONPATH": str(REPO), "MASTER_PORT": "29612", **env}
        # without the guard this child waits in FileBaton.wait forever: the timeout is the failure
        return subprocess.run([sys.executable, "-c", ZERO3_CHILD, str(config)], capture_output=True,
                              text=True, timeout=240, env=environ)

    holder = None
    try:
        for lock in locks:
            lock.parent.mkdir(parents=True, exist_ok=True)
            lock.touch()
        result = child()
        assert result.returncode == 0, result.stderr[-3000:]
        assert "zero3 ready" in result.stdout
        assert f"stale op build lock no process holds: {locks[0]}" in result.stderr
        assert not any(lock.exists() for lock in locks)

        locks[0].touch()
        holder = hold(locks[0])
        start = time.monotonic()
        result = child(**{oplocks.WAIT_ENV: "3"})
        assert time.monotonic() - start < 120
        assert result.returncode != 0 and "zero3 ready" not in result.stdout
        assert f"the op build lock {locks[0]} has been held" in result.stderr
        assert f"pid {holder.pid}" in result.stderr
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
        for lock in locks:
            lock.unlink(missing_ok=True)
