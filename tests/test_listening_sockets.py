"""What `loraforge run`'s local Ray instance listens on: its own servers on loopback only, and every
port Ray itself opens to the network one of the documented few (README, "Ports and exposure")."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import REPO, minilm_config, write_yaml

pytestmark = pytest.mark.slow

# Ray 2.60 binds these to every interface (or to the node's address) and has no option for loopback;
# the README lists them with the firewall rule. Anything else off loopback fails the test.
RAY_NETWORK_LISTENERS = {
    "gcs_server": "GCS (ray.init: a random port; ray start: --port, 6379)",
    "raylet": "raylet node manager and object manager",
    "ray::DashboardAgent": "dashboard agent (HTTP 52365 on the node address, gRPC, metrics)",
    "ray::RuntimeEnvAgent": "runtime env agent",
    "ray::": "core workers' gRPC (every worker and actor process)",
    "autoscaler/_private/monitor.py": "autoscaler metrics (44217)",
    "dashboard/dashboard.py": "dashboard metrics export (44227); the dashboard itself is on loopback",
}
# the driver (`loraforge run`) is a Ray core worker too: its one gRPC port is Ray's, any other is ours
DRIVER_RAY_PORTS = 1


def is_loopback(host: str) -> bool:
    host = host.removeprefix("::ffff:")
    return ipaddress.ip_address(host).is_loopback


def ray_component(name: str, cmdline: str) -> str | None:
    for marker in RAY_NETWORK_LISTENERS:
        if name == marker or marker in cmdline or name.startswith(marker):
            return marker
    return None


def listeners(root: psutil.Process) -> list[tuple[str, int, str, str]]:
    """(host, port, process name, command line) of every listening socket in the process tree."""
    try:
        pids = {root.pid} | {p.pid for p in root.children(recursive=True)}
    except psutil.NoSuchProcess:
        return []
    found = []
    for conn in psutil.net_connections("inet"):
        if conn.status == psutil.CONN_LISTEN and conn.pid in pids:
            try:
                owner = psutil.Process(conn.pid)
                found.append((conn.laddr.ip, conn.laddr.port, owner.name(), " ".join(owner.cmdline())))
            except psutil.Error:
                pass
    return found


def test_loraforge_run_binds_its_servers_to_loopback(tmp_path: Path, sst2_small):
    config = minilm_config(tmp_path, sst2_small, data={"max_train_examples": 96}, train={"eval_every_steps": 3})
    path = write_yaml(tmp_path / "exp.yaml", config)
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))} | {
        "HOME": str(home), "RAY_AUTH_MODE": "token", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([str(Path(sys.executable).parent / "loraforge"), "run", str(path), "--reports-dir", str(tmp_path / "r")],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    root = psutil.Process(proc.pid)
    seen: dict[tuple[str, int], tuple[str, str]] = {}
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline:
        for host, port, name, cmdline in listeners(root):
            seen.setdefault((host, port), ("driver" if name == "loraforge" else name, cmdline))
        time.sleep(2)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out[-4000:]
    assert seen, "saw no listening socket at all"

    # the dashboard (and the job API on it) is ours to place: loopback, as run.connect_ray asks
    dashboard = [(h, p) for (h, p), (name, cmdline) in seen.items()
                 if ray_component(name, cmdline) == "dashboard/dashboard.py" and p != 44227]
    assert dashboard and all(is_loopback(h) for h, _ in dashboard), dashboard
    off_loopback = {(h, p): owner for (h, p), owner in seen.items() if not is_loopback(h)}
    driver = [hp for hp, (name, _) in off_loopback.items() if name == "driver"]
    assert len(driver) <= DRIVER_RAY_PORTS, f"the driver listens off loopback on {driver}: only Ray's core worker may"
    unexpected = sorted(f"{h}:{p} {name} {cmdline[:120]}" for (h, p), (name, cmdline) in off_loopback.items()
                        if name != "driver" and ray_component(name, cmdline) is None)
    assert not unexpected, unexpected
