"""PostgreSQL and an MLflow tracking server with the basic-auth app, on loopback ports, for the tests.

The same steps as the recipe in docs/tracking.md: `initdb` a temporary cluster (as the `postgres` user when
running as root, which initdb refuses), start it on a free port, create the tracking and auth
databases, then `mlflow server --app-name basic-auth` with artifacts served through the server.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ADMIN, ADMIN_PASSWORD = "admin", "admin-password-for-tests"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_postgres(command: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return command
    return ["su", "postgres", "-s", "/bin/sh", "-c", " ".join(f"'{c}'" for c in command)]


@dataclass
class Postgres:
    root: Path
    port: int = field(default_factory=free_port)

    @property
    def data(self) -> Path:
        return self.root / "data"

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def start(self, databases: tuple[str, ...] = ("mlflow", "mlflow_auth")) -> "Postgres":
        self.root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres")
        subprocess.run(_as_postgres(["initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8"]),
                       check=True, capture_output=True)
        subprocess.run(_as_postgres(["pg_ctl", "-D", str(self.data), "-l", str(self.root / "postgres.log"), "-w", "-o",
                                     f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1", "start"]),
                       check=True, capture_output=True)
        self.create(*databases)
        return self

    def create(self, *databases: str) -> None:
        for database in databases:
            subprocess.run(["createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", database],
                           check=True, capture_output=True)

    def stop(self) -> None:
        subprocess.run(_as_postgres(["pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop"]), capture_output=True)


@dataclass
class MlflowServer:
    postgres: Postgres
    root: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None
    databases: tuple[str, str] = ("mlflow", "mlflow_auth")
    # where the server keeps artifacts (default: a folder under root), e.g. s3://bucket/prefix, and what it needs for it
    artifacts_destination: str | None = None
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    def start(self, timeout_s: float = 120) -> "MlflowServer":
        self.root.mkdir(parents=True, exist_ok=True)
        auth_ini = self.root / "basic_auth.ini"
        auth_ini.write_text(
            "[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
            f"database_uri = {self.postgres.url(self.databases[1])}\nadmin_username = {ADMIN}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            # without it every request pays a PBKDF2 password check on the server
            "auth_cache_ttl_seconds = 60\n")
        env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(auth_ini), "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD,
               "MLFLOW_FLASK_SERVER_SECRET_KEY": "tests-only-flask-secret-key",
               "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""), **self.extra_env}
        for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_URI"):
            env.pop(key, None)
        log = (self.root / "server.log").open("ab")
        self.process = subprocess.Popen(
            [str(Path(sys.executable).with_name("mlflow")), "server", "--app-name", "basic-auth",
             "--backend-store-uri", self.postgres.url(self.databases[0]),
             "--artifacts-destination", self.artifacts_destination or str(self.artifacts),
             "--serve-artifacts", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process.poll() is None, (self.root / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=2):
                    return self
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"mlflow server did not answer on {self.uri}: {(self.root / 'server.log').read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL the server and its workers (a crash, not a shutdown)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, 9)
            self.process.wait(30)

    def rest(self, path: str, body: dict | None = None) -> dict:
        """One REST call as the admin, without touching the process environment (other threads read it)."""
        import base64
        import json

        request = urllib.request.Request(self.uri + path, data=json.dumps(body).encode() if body is not None else None,
                                         headers={"Content-Type": "application/json", "Authorization": "Basic " +
                                                  base64.b64encode(f"{ADMIN}:{ADMIN_PASSWORD}".encode()).decode()})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read() or b"{}")

    def admin(self) -> dict[str, str]:
        return {"MLFLOW_TRACKING_USERNAME": ADMIN, "MLFLOW_TRACKING_PASSWORD": ADMIN_PASSWORD}

    def create_user(self, username: str, password: str) -> None:
        from mlflow.server.auth.client import AuthServiceClient

        with _env(self.admin()):
            AuthServiceClient(self.uri).create_user(username, password)

    def grant_experiment(self, experiment_id: str, username: str, permission: str) -> None:
        from mlflow.server.auth.client import AuthServiceClient

        with _env(self.admin()):
            AuthServiceClient(self.uri).grant_user_permission(username, "experiment", experiment_id, permission)


class _env:
    """Environment variables set for a block (MLflow reads credentials from the environment)."""

    def __init__(self, values: dict[str, str | None]):
        self.values, self.saved = values, {}

    def __enter__(self) -> None:
        for key, value in self.values.items():
            self.saved[key] = os.environ.get(key)
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    def __exit__(self, *exc: object) -> None:
        for key, value in self.saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


env = _env
