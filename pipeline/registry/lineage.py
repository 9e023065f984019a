"""Where a run and a registered version came from: base model identity, datasets, code and library versions.

Everything here is computed once in the driver and recorded as tags (things that do not change
during a run) and as MLflow dataset inputs; nothing that changes under PBT is a param.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import os
import subprocess
from pathlib import Path
from typing import Any

from pipeline import gguf
from pipeline.config import PKG_PREFIX, ExperimentConfig, ModelSpec, package_path

LIBRARIES = ("torch", "transformers", "peft", "ray", "deepspeed", "bitsandbytes", "mlflow")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
GIT_COMMIT_TAG = "mlflow.source.git.commit"


def _file_sha256(path: Path) -> str:
    return gguf.file_sha256(path)  # cached per (path, size, mtime)


def weights_sha256(path: Path) -> str:
    """sha256 of a weight file, or of a folder's weight files (their names and hashes, sorted)."""
    if path.is_file():
        return _file_sha256(path)
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.relative_to(path)}\0{_file_sha256(file)}\n".encode())
    return digest.hexdigest()


def _source_path(model: ModelSpec) -> Path:
    """The file or folder the user named (a shipped GGUF file, not its converted cache)."""
    name = model.name_or_path
    return Path(package_path(name[len(PKG_PREFIX):]) if name.startswith(PKG_PREFIX) else name).expanduser()


def _distribution(package: str) -> tuple[str, str] | None:
    for dist in importlib.metadata.packages_distributions().get(package, []):
        try:
            return dist, importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


@functools.lru_cache(maxsize=8)
def base_identity(name_or_path: str) -> dict[str, str]:
    """`name` (as configured), `sha256` of its weights and, for a shipped model, `package` and `package_version`."""
    model = ModelSpec(name_or_path=name_or_path)
    source = _source_path(model)
    identity = {"name": name_or_path, "sha256": weights_sha256(source)}
    if name_or_path.startswith(PKG_PREFIX):
        package = name_or_path[len(PKG_PREFIX):].partition("/")[0]
        if found := _distribution(package):
            identity["package"], identity["package_version"] = found
    else:
        identity["path"] = str(source.resolve())
    return identity


def library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the loraforge checkout this code runs from (None when installed from a wheel).

    A submitted job runs from an upload without .git: `loraforge submit` passes the commit in LORAFORGE_GIT_COMMIT.
    """
    if submitted := os.environ.get("LORAFORGE_GIT_COMMIT"):
        return submitted
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and len(commit) == 40 else None


def dataset_record(path: Path, rows: int, context: str) -> dict[str, Any]:
    """One dataset as MLflow records it: name, digest (sha256 of the file), source path, rows, context."""
    return {"name": path.name, "sha256": _file_sha256(path.resolve()),
            "source": str(path.resolve()), "rows": rows, "context": context}


def datasets(config: ExperimentConfig, train_rows: int, eval_rows: int) -> list[dict[str, Any]]:
    return [dataset_record(Path(config.data.train_path), train_rows, "training"),
            dataset_record(Path(config.data.eval_path), eval_rows, "evaluation")]


def base_tags(base: dict[str, str], without: tuple[str, ...] = ()) -> dict[str, str]:
    """The base model's identity (`base_identity`) as `loraforge.base.*` tags."""
    return {f"loraforge.base.{k}": v for k, v in base.items() if k not in without}


def run_tags(base: dict[str, str]) -> dict[str, str]:
    """Tags every sweep and trial run gets: the code commit, library versions, the base model's identity."""
    tags = {f"loraforge.version.{k}": v for k, v in library_versions().items()}
    tags.update(base_tags(base))
    if commit := git_commit():
        tags[GIT_COMMIT_TAG] = commit
    return tags


def version_tags(config: ExperimentConfig, base: dict[str, str], records: list[dict[str, Any]], *,
                 sweep_run_id: str, trial_id: str, trial_run_id: str) -> dict[str, str]:
    """A registered version's lineage: what it was trained from and with, and by which sweep and trial."""
    targets = config.lora.target_modules
    # a local base's path is a run's business (where it ran), not the version's
    tags = {
        **base_tags(base, without=("path",)),
        "loraforge.strategy": config.strategy.kind, "loraforge.lora.r": str(config.lora.r),
        "loraforge.lora.alpha": str(config.lora.alpha), "loraforge.lora.target_modules":
            "+".join(targets) if isinstance(targets, list) else str(targets),
        "loraforge.lora.use_rslora": str(config.lora.use_rslora), "loraforge.lora.use_dora": str(config.lora.use_dora),
        "loraforge.lora.init": config.lora.init, "loraforge.lora.loraplus_lr_ratio": str(config.lora.loraplus_lr_ratio),
        "loraforge.train.lr": repr(config.train.lr),
        "loraforge.sweep_run_id": sweep_run_id, "loraforge.trial_id": trial_id, "loraforge.trial_run_id": trial_run_id,
        "loraforge.experiment": config.name,
    }
    for record in records:
        tags[f"loraforge.data.{record['context']}.sha256"] = record["sha256"]
        tags[f"loraforge.data.{record['context']}.rows"] = str(record["rows"])
    if commit := git_commit():
        tags["loraforge.code_commit"] = commit
    return tags
