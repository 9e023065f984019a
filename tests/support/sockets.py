"""What a `loraforge run` process tree listens on: its own servers on loopback only, and every port
Ray itself opens to the network one of the documented few (docs/cluster.md, "Ports and exposure").

`ListenerWatch` samples the listening sockets of a process and its children in a thread while the
run goes on; `assert_loopback_only` judges what it saw."""

from __future__ import annotations

import ipaddress
import threading

import psutil

# Ray 2.60 binds these to every interface (or to the node's address) and has no option for loopback;
# docs/cluster.md lists them with the firewall rule. Anything else off loopback fails the test.
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
DASHBOARD_METRICS_PORT = 44227


def is_loopback(host: str) -> bool:
    return ipaddress.ip_address(host.removeprefix("::ffff:")).is_loopback


def ray_component(name: str, cmdline: str) -> str | None:
    for marker in RAY_NETWORK_LISTENERS:
        if name == marker or marker in cmdline or name.startswith(marker):
            return marker
    return None


def listeners(root: psutil.Process) -> list[tuple[str, int, int, str, str]]:
    """(host, port, pid, process name, command line) of every listening socket in the process tree."""
    try:
        pids = {root.pid} | {p.pid for p in root.children(recursive=True)}
    except psutil.NoSuchProcess:
        return []
    found = []
    for conn in psutil.net_connections("inet"):
        if conn.status == psutil.CONN_LISTEN and conn.pid in pids:
            try:
                owner = psutil.Process(conn.pid)
                found.append((conn.laddr.ip, conn.laddr.port, conn.pid, owner.name(), " ".join(owner.cmdline())))
            except psutil.Error:
                pass
    return found


class ListenerWatch:
    """Samples `listeners(pid)` every `interval_s` until stopped; `seen` maps (host, port) to its owner."""

    def __init__(self, pid: int, interval_s: float = 2.0):
        self.root = psutil.Process(pid)
        self.interval_s = interval_s
        self.seen: dict[tuple[str, int], tuple[str, str]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            for host, port, pid, name, cmdline in listeners(self.root):
                self.seen.setdefault((host, port), ("driver" if pid == self.root.pid else name, cmdline))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "ListenerWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def assert_loopback_only(seen: dict[tuple[str, int], tuple[str, str]]) -> None:
    assert seen, "saw no listening socket at all"
    # the dashboard (and the job API on it) is ours to place: loopback, as run.connect_ray asks
    dashboard = [(h, p) for (h, p), (name, cmdline) in seen.items()
                 if ray_component(name, cmdline) == "dashboard/dashboard.py" and p != DASHBOARD_METRICS_PORT]
    assert dashboard and all(is_loopback(h) for h, _ in dashboard), dashboard
    off_loopback = {(h, p): owner for (h, p), owner in seen.items() if not is_loopback(h)}
    driver = [hp for hp, (name, _) in off_loopback.items() if name == "driver"]
    assert len(driver) <= DRIVER_RAY_PORTS, f"the driver listens off loopback on {driver}: only Ray's core worker may"
    unexpected = sorted(f"{h}:{p} {name} {cmdline[:120]}" for (h, p), (name, cmdline) in off_loopback.items()
                        if name != "driver" and ray_component(name, cmdline) is None)
    assert not unexpected, unexpected
