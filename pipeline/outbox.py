"""Nothing lost when the tracking server goes away: MLflow writes wait in an on-disk outbox.

`tracking.client()` wraps MLflow's client in `ResilientClient` for HTTP stores when an outbox
folder is set (`loraforge run` sets `LORAFORGE_MLFLOW_OUTBOX` before Ray starts, so every
trial worker inherits it). Writes (metrics, params, tags, artifacts, dataset inputs, run
status) that cannot reach the server are appended to `<outbox>/<host>-<pid>.jsonl`, artifact
files copied beside it, and training goes on. Once anything waits for a run, later writes
queue behind it, so the server receives each run's writes in order. Every write retries the
queue first (at most every `RETRY_S`); the driver drains all processes' queues at the end of
the run, and `loraforge mlflow sync OUTBOX_DIR` drains what is left by hand.

Reads and Model Registry calls are not queued: they need an answer. Replays are exact
copies (metric timestamps included), so a write the server had applied before the
connection dropped is stored once: MLflow keys metric points by (key, timestamp, step,
value) and params and tags by key.

A queue survives a crash: each entry is one line appended and fsynced under the queue's lock
(a `.lock` file beside it), a drain replaces the queue whole (write-temp, fsync, rename) and
unlinks an emptied one under the same lock, and a line cut short by a kill or a full disk is
moved to `torn.txt` (and counted) instead of stopping every later replay.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

from pipeline import atomic

log = logging.getLogger("loraforge")


def raw_client(tracking_uri: str) -> Any:
    """MLflow's own client for `tracking_uri` (pipeline.tracking.client adds the outbox to it)."""
    from mlflow import MlflowClient

    # the registry URI is given explicitly: left out, MLflow falls back to a process-global
    # one that any other code in the process may have set
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def log_datasets(mlflow_client: Any, run_id: str, records: list[dict[str, Any]]) -> None:
    """The datasets as the run's MLflow inputs (shown in the UI's Datasets panel), context as MLflow's tag."""
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    inputs = [DatasetInput(
        Dataset(name=r["name"], digest=r["sha256"][:32], source_type="local",
                source=json.dumps({"uri": Path(r["source"]).as_uri()}),
                profile=json.dumps({"num_rows": r["rows"]})),
        tags=[InputTag(MLFLOW_DATASET_CONTEXT, r["context"])]) for r in records]
    mlflow_client.log_inputs(run_id, datasets=inputs)

ENV_VAR = "LORAFORGE_MLFLOW_OUTBOX"
RETRY_S = 10.0  # after a failed write, queue without trying the server for this long
FILES = "files"
SENT_LOG = "sent.log"  # one JSON line per drain that sent anything
REJECTED = "rejected.jsonl"  # entries the server answered with an error other than being away
TORN = "torn.txt"  # lines that do not parse (a write cut short), set aside as they were


def unreachable(err: BaseException) -> bool:
    """The server is away (refused, reset, timed out, 5xx after retries), not a bad request."""
    text = str(err)
    if err.__class__.__name__ in ("ConnectionError", "Timeout", "ReadTimeout", "ConnectTimeout"):
        return True
    markers = ("Max retries exceeded", "Connection refused", "Connection aborted", "Connection reset",
               "Failed to establish a new connection", "Read timed out", "RemoteDisconnected",
               "too many 500 error responses", "too many 502 error responses", "too many 503 error responses")
    return any(m in text for m in markers)


class Outbox:
    """A folder of JSON-lines queues (one per process) and the artifact files they refer to."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.mine = self.root / f"{socket.gethostname()}-{os.getpid()}.jsonl"

    @contextlib.contextmanager
    def _locked(self, path: Path) -> Iterator[None]:
        """Holds the queue's lock file: the queue itself is replaced by rename, so it cannot carry the lock."""
        with open(path.with_name(path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def put(self, op: str, **payload: Any) -> None:
        entry = {"id": uuid.uuid4().hex, "op": op, "time": time.time(), **payload}
        with self._locked(self.mine), open(self.mine, "ab+") as f:
            f.seek(0, os.SEEK_END)
            if f.tell():
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":  # a line cut short: end it, so this entry is not glued to it
                    f.write(b"\n")
            f.write((json.dumps(entry) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())

    def keep_file(self, path: Path) -> str:
        """A copy of `path` (file or folder) that outlives the caller's temp dir; returns it relative to the outbox."""
        dst = self.root / FILES / uuid.uuid4().hex / Path(path).name
        dst.parent.mkdir(parents=True)
        if Path(path).is_dir():
            shutil.copytree(path, dst)
        else:
            shutil.copy2(path, dst)
        return str(dst.relative_to(self.root))

    def queues(self) -> list[Path]:
        return sorted(p for p in self.root.glob("*.jsonl") if p.name != REJECTED)

    def torn_total(self) -> int:
        path = self.root / TORN
        return len(path.read_text(errors="replace").splitlines()) if path.is_file() else 0

    def _read(self, path: Path) -> list[dict[str, Any]]:
        """The queue's entries; lines that do not parse are moved to TORN (caller holds the lock)."""
        entries, torn = [], []
        for line in path.read_bytes().splitlines():
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                if not isinstance(entry, dict) or "op" not in entry:
                    raise ValueError("not an outbox entry")
                entries.append(entry)
            except ValueError:
                torn.append(line)
        if torn:
            with open(self.root / TORN, "ab") as f:
                f.write(b"".join(t + b"\n" for t in torn))
                f.flush()
                os.fsync(f.fileno())
            log.warning("outbox: %d line(s) of %s were cut short or garbled (a process killed mid-write?); set aside "
                        "in %s, the other entries replay", len(torn), path, self.root / TORN)
        return entries

    def sent_total(self) -> int:
        path = self.root / SENT_LOG
        return sum(json.loads(line)["sent"] for line in path.read_text().splitlines()) if path.is_file() else 0

    def pending(self, path: Path | None = None) -> int:
        paths = [path] if path else self.queues()
        return sum(1 for p in paths if p.is_file() for line in p.read_bytes().splitlines() if line.strip())

    def drain(self, mlflow_client: Any, only: Path | None = None) -> tuple[int, int]:
        """Send queued writes in order, queue by queue; stop a queue at the first that cannot be sent.

        Returns (sent, left). Each queue is rewritten under its lock with what is left, so
        two processes draining at once never send the same entry twice.
        """
        sent = left = 0
        for path in [only] if only else self.queues():
            if not path.is_file():
                continue
            with self._locked(path):
                if not path.is_file():  # another drain emptied and removed it while this one waited
                    continue
                entries = self._read(path)
                done = 0
                for entry in entries:
                    try:
                        self._send(mlflow_client, entry)
                    except Exception as err:
                        if not unreachable(err):
                            # the server answers but refuses it (a deleted run, a revoked permission): set it
                            # aside with the reason, so one bad entry neither blocks the queue nor is lost
                            log.error("outbox: the server refuses %s for run %s (%s); kept in %s", entry["op"],
                                      entry.get("run_id"), err, self.root / REJECTED)
                            with open(self.root / REJECTED, "a") as rejected:
                                rejected.write(json.dumps({**entry, "error": str(err)[:2000]}) + "\n")
                            entry.pop("file", None)  # its copy stays for a later look
                            done += 1
                            continue
                        break
                    done += 1
                rest = entries[done:]
                if not rest and path != self.mine:
                    path.unlink()
                else:
                    atomic.write_text(path, "".join(json.dumps(e) + "\n" for e in rest))
            sent += done
            left += len(rest)
            for entry in entries[:done]:
                if entry.get("file"):
                    shutil.rmtree(self.root / Path(entry["file"]).parent, ignore_errors=True)
        if sent:  # an audit trail of what was replayed, and by whom
            with open(self.root / SENT_LOG, "a") as f:
                f.write(json.dumps({"time": time.time(), "host": socket.gethostname(), "pid": os.getpid(),
                                    "sent": sent, "left": left}) + "\n")
        return sent, left

    def _send(self, mlflow_client: Any, entry: dict[str, Any]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        run_id = entry["run_id"]
        match entry["op"]:
            case "log_batch":
                mlflow_client.log_batch(
                    run_id, metrics=[Metric(k, v, ts, step) for k, v, ts, step in entry.get("metrics", [])],
                    params=[Param(k, v) for k, v in entry.get("params", [])],
                    tags=[RunTag(k, v) for k, v in entry.get("tags", [])])
            case "log_artifact":
                path = self.root / entry["file"]
                if path.is_dir():
                    mlflow_client.log_artifacts(run_id, str(path), entry.get("artifact_path"))
                else:
                    mlflow_client.log_artifact(run_id, str(path), entry.get("artifact_path"))
            case "set_terminated":
                mlflow_client.set_terminated(run_id, status=entry.get("status"), end_time=entry.get("end_time"))
            case "log_inputs":
                log_datasets(mlflow_client, run_id, entry["datasets"])
            case op:
                raise ValueError(f"outbox: unknown operation {op!r}")


class ResilientClient:
    """MLflow's client with its writes queued in an `Outbox` while the server cannot be reached."""

    def __init__(self, mlflow_client: Any, outbox: Outbox):
        self._client = mlflow_client
        self._outbox = outbox
        self._quiet_until = 0.0

    def __getattr__(self, name: str) -> Any:  # reads, run creation and the registry: straight to the server
        return getattr(self._client, name)

    def _queue(self, op: str, payload: dict[str, Any]) -> None:
        if "local" in payload:  # the caller's file may be a temp file: the queue keeps its own copy
            payload["file"] = self._outbox.keep_file(Path(payload.pop("local")))
        self._outbox.put(op, **payload)

    def _write(self, op: str, call: Any, **payload: Any) -> None:
        now = time.monotonic()
        if now < self._quiet_until:
            self._queue(op, payload)
            return
        if self._outbox.pending(self._outbox.mine):
            _, left = self._outbox.drain(self._client, only=self._outbox.mine)
            if left:
                self._quiet_until = now + RETRY_S
                self._queue(op, payload)
                return
        try:
            call()
        except Exception as err:
            if not unreachable(err):
                raise
            self._quiet_until = now + RETRY_S
            log.warning("MLflow server unreachable (%s): queued %s for run %s in %s", type(err).__name__, op,
                        payload.get("run_id"), self._outbox.root)
            self._queue(op, payload)

    def log_batch(self, run_id: str, metrics: Any = (), params: Any = (), tags: Any = (), **kw: Any) -> None:
        metrics, params, tags = list(metrics or []), list(params or []), list(tags or [])
        self._write("log_batch", lambda: self._client.log_batch(run_id, metrics=metrics, params=params, tags=tags, **kw),
                    run_id=run_id, metrics=[[m.key, m.value, m.timestamp, m.step] for m in metrics],
                    params=[[p.key, p.value] for p in params], tags=[[t.key, t.value] for t in tags])

    def log_param(self, run_id: str, key: str, value: Any) -> None:
        from mlflow.entities import Param

        self.log_batch(run_id, params=[Param(key, str(value))])

    def set_tag(self, run_id: str, key: str, value: Any) -> None:
        from mlflow.entities import RunTag

        self.log_batch(run_id, tags=[RunTag(key, str(value))])

    def log_metric(self, run_id: str, key: str, value: float, timestamp: int | None = None, step: int | None = None) -> None:
        from mlflow.entities import Metric

        self.log_batch(run_id, metrics=[Metric(key, value, timestamp or int(time.time() * 1000), step or 0)])

    def log_artifact(self, run_id: str, local_path: str, artifact_path: str | None = None) -> None:
        self._write("log_artifact", lambda: self._client.log_artifact(run_id, local_path, artifact_path),
                    run_id=run_id, local=str(local_path), artifact_path=artifact_path)

    def log_artifacts(self, run_id: str, local_dir: str, artifact_path: str | None = None) -> None:
        self._write("log_artifact", lambda: self._client.log_artifacts(run_id, local_dir, artifact_path),
                    run_id=run_id, local=str(local_dir), artifact_path=artifact_path)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(artifact_file).name
            path.write_text(text)
            parent = str(Path(artifact_file).parent)
            self.log_artifact(run_id, str(path), None if parent == "." else parent)

    def set_terminated(self, run_id: str, status: str | None = None, end_time: int | None = None) -> None:
        end_time = end_time or int(time.time() * 1000)
        self._write("set_terminated", lambda: self._client.set_terminated(run_id, status=status, end_time=end_time),
                    run_id=run_id, status=status, end_time=end_time)

    def log_datasets(self, run_id: str, records: list[dict[str, Any]]) -> None:
        self._write("log_inputs", lambda: log_datasets(self._client, run_id, records),
                    run_id=run_id, datasets=records)


def drain_at_end(tracking_uri: str, wait_s: float) -> tuple[int, int, Path | None]:
    """The driver, when the run ends: send every process's queued writes, waiting up to `wait_s` for the server."""
    root = os.environ.get(ENV_VAR)
    if not root or not Path(root).is_dir():
        return 0, 0, None
    outbox = Outbox(Path(root))
    deadline = time.monotonic() + wait_s
    sent = 0
    while True:
        done, left = outbox.drain(raw_client(tracking_uri))
        sent += done
        if not left or time.monotonic() >= deadline:
            return sent, left, outbox.root
        time.sleep(2.0)
