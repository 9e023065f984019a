"""Real Ray clusters on loopback for the tests: `ray start --head` plus `ray start --address` nodes.

Token auth is on (RAY_AUTH_MODE=token, a fresh token) and every process gets a temporary HOME, so
no token from another test or a stray `ray.init()` leaks in or out. Each node has its own
`--temp-dir` and ports, so one node can be killed alone.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psutil

BIN = Path(sys.executable).parent


def stop_every_ray(env: dict[str, str] | None = None) -> None:
    """`ray stop --force`, which ends every Ray instance on the machine, after ending this process's own.

    A driver whose GCS is killed under it exits a minute later, and pytest is such a driver whenever a
    test left `ray.init()`'s instance running (the pipeline and the eval stage start one and keep it).
    """
    import ray

    if ray.is_initialized():
        ray.shutdown()
    subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)


def start_local_ray(*, hooks: bool = False, **env: str) -> None:
    """A fresh local Ray instance in this process, as the tests use it (ending any it had).

    `hooks`: every worker runs tests/support/fault_hooks.py's setup hook, which reads its switches from `env`.
    """
    import ray

    if ray.is_initialized():
        ray.shutdown()
    # no preemption watcher, as pipeline.cluster.connect_ray starts a local instance (one more process per trial)
    runtime_env: dict = {"env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
                                      "HF_HUB_OFFLINE": "1", **env}}
    if hooks:
        runtime_env["env_vars"]["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])  # the repo root
        runtime_env["worker_process_setup_hook"] = "tests.support.fault_hooks.install"
    ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", runtime_env=runtime_env)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Node:
    name: str
    temp_dir: Path
    node_manager_port: int

    def raylet(self) -> psutil.Process | None:
        flag = f"--node_manager_port={self.node_manager_port}"
        for proc in psutil.process_iter(["name", "cmdline"]):
            if proc.info["name"] == "raylet" and flag in (proc.info["cmdline"] or []):
                return proc
        return None


@dataclass
class LocalCluster:
    root: Path
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    gcs_port: int = field(default_factory=free_port)
    dashboard_port: int = field(default_factory=free_port)
    nodes: list[Node] = field(default_factory=list)
    # Ray's socket paths must fit in 107 bytes: node temp dirs live in a short folder of their own
    short: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="lfray-", dir="/tmp")))

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def home(self) -> Path:
        return self.root / "home"

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of the cluster's processes and of clients that hold the token."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_TRACKING"))}
        env.update(HOME=str(self.home), PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", RAY_AUTH_MODE="token",
                   RAY_AUTH_TOKEN=self.token, RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.5", RAY_TRAIN_V2_ENABLED="1",
                   HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        env.update(extra)
        return env

    def client_env(self, **extra: str) -> dict[str, str]:
        """A client's environment as a user has it: the token, but RAY_AUTH_MODE left for loraforge to set."""
        env = self.env(**extra)
        env.pop("RAY_AUTH_MODE")
        return env

    def _start(self, args: list[str], node: Node) -> None:
        node.temp_dir.mkdir(parents=True, exist_ok=True)
        out = subprocess.run([str(BIN / "ray"), "start", *args, f"--temp-dir={node.temp_dir}",
                              f"--node-manager-port={node.node_manager_port}", f"--object-manager-port={free_port()}",
                              "--disable-usage-stats"],
                             env=self.env(), capture_output=True, text=True, timeout=180)
        if out.returncode != 0:
            raise RuntimeError(f"ray start {node.name} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        self.nodes.append(node)

    def start_head(self, num_cpus: int, resources: str | None = None) -> Node:
        self.home.mkdir(parents=True, exist_ok=True)
        node = Node("head", self.short / "head", free_port())
        args = ["--head", "--node-ip-address=127.0.0.1", f"--port={self.gcs_port}", f"--num-cpus={num_cpus}",
                "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={free_port()}"]
        self._start(args + ([f"--resources={resources}"] if resources else []), node)
        return node

    def add_worker(self, name: str, num_cpus: int) -> Node:
        node = Node(name, self.short / name, free_port())
        self._start([f"--address=127.0.0.1:{self.gcs_port}", "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}"], node)
        return node

    def kill(self, node: Node) -> None:
        """SIGKILL a node's raylet and everything under it (its workers, agents), and every process started
        for it (on the head: the GCS and the dashboard, which are not the raylet's children): the node is gone."""
        raylet = node.raylet()
        assert raylet is not None, f"no raylet for {node.name}"
        procs = [raylet, *raylet.children(recursive=True)]
        for proc in psutil.process_iter(["cmdline"]):
            if str(node.temp_dir) in " ".join(proc.info["cmdline"] or []) and proc not in procs:
                procs.append(proc)
        for proc in procs:
            try:
                proc.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=30)
        self.nodes.remove(node)

    def wait_for_nodes(self, count: int, timeout_s: float = 60) -> None:
        import json
        import urllib.request

        deadline = time.time() + timeout_s
        while time.time() < deadline:
            request = urllib.request.Request(f"{self.address}/nodes?view=summary",
                                             headers={"Authorization": f"Bearer {self.token}"})
            try:
                with urllib.request.urlopen(request, timeout=10) as reply:
                    summary = json.load(reply)["data"]["summary"]
                if sum(1 for n in summary if n.get("raylet", {}).get("state") == "ALIVE") >= count:
                    return
            except (OSError, KeyError, ValueError):
                pass
            time.sleep(1)
        raise TimeoutError(f"{count} nodes did not come up in {timeout_s} s")

    def stop(self) -> None:
        # `ray stop` on this cluster's HOME, then anything of its temp dirs still alive
        stop_every_ray(self.env())
        # a job's driver (`python jobs/sweep.py`, run by its supervisor actor) names no temp dir, but it
        # runs in the job's working dir under one: left alive it would load the machine for later tests
        root = f"{self.short}/"  # every node's temp dir is under it, a killed node's too
        for proc in psutil.process_iter(["cmdline", "cwd"]):
            if root in " ".join(proc.info["cmdline"] or []) or (proc.info["cwd"] or "").startswith(root):
                try:
                    proc.kill()
                except psutil.NoSuchProcess:
                    pass
        shutil.rmtree(self.short, ignore_errors=True)
