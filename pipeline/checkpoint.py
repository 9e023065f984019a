"""Trial checkpoints: what goes in them, how they are verified, which one a restarted trial resumes from.

A checkpoint directory (one per `ray.train.report`, each rank's files merged into it):

- `adapter_config.json`, `adapter_model.safetensors`, `loraforge.json`: the PEFT
  adapter (rank 0), loadable with `PeftModel.from_pretrained` and nothing else;
- `train_state.rank<r>.safetensors`: rank r's optimizer state and RNG state, so a
  restarted worker continues the same run instead of a new one;
- `MANIFEST.rank<r>.json`: sha256 and size of every file rank r wrote.

Nothing here unpickles: nested states are stored as tensors plus a JSON skeleton.
`verify` is the export guard: manifests complete and matching, adapter tensors
present and non-empty (ZeRO-3's known failure is `[0]`-shaped saves).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from pipeline import adapters, atomic

log = logging.getLogger(__name__)

_TENSOR, _DICT, _TUPLE = "__tensor__", "__dict__", "__tuple__"


class CheckpointError(RuntimeError):
    """No checkpoint of a trial can be trusted; the trial must not silently start over."""


def state_file(rank: int) -> str:
    return f"train_state.rank{rank}.safetensors"


def manifest_file(rank: int) -> str:
    return f"MANIFEST.rank{rank}.json"


# ---------------------------------------------------------------------------- nested state <-> safetensors


def _flatten(obj: Any, tensors: dict[str, torch.Tensor], seen: dict[int, str]) -> Any:
    if isinstance(obj, torch.Tensor):
        if id(obj) in seen:
            # the same tensor object twice (8-bit optimizers share their quantization maps)
            return {_TENSOR: seen[id(obj)]}
        key = seen[id(obj)] = str(len(tensors))
        # a copy: safetensors refuses tensors that share memory with each other
        tensors[key] = obj.detach().cpu().clone().contiguous()
        return {_TENSOR: key}
    if isinstance(obj, dict):
        # keys keep their type (optimizer states are keyed by int)
        return {_DICT: [[k, _flatten(v, tensors, seen)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {_TUPLE: [_flatten(v, tensors, seen) for v in obj]}
    if isinstance(obj, list):
        return [_flatten(v, tensors, seen) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint")


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if _TENSOR in obj:
            return tensors[obj[_TENSOR]]
        if _DICT in obj:
            return {k: _unflatten(v, tensors) for k, v in obj[_DICT]}
        if _TUPLE in obj:
            return tuple(_unflatten(v, tensors) for v in obj[_TUPLE])
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


def save_state(path: Path, state: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten(state, tensors, {})
    save_file(tensors, str(path), metadata={"skeleton": json.dumps(skeleton)})


def load_state(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        skeleton = json.loads(f.metadata()["skeleton"])
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    return _unflatten(skeleton, tensors)


# ---------------------------------------------------------------------------- manifests and the guard


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: Path, rank: int) -> None:
    """Hash every file this rank put in `directory` (call last, after all its writes)."""
    directory = Path(directory)
    files = {p.name: {"sha256": _sha256(p), "bytes": p.stat().st_size}
             for p in sorted(directory.iterdir()) if p.is_file() and not p.name.startswith("MANIFEST")}
    atomic.write_text(directory / manifest_file(rank), json.dumps({"rank": rank, "files": files}, indent=1))


def adapter_problems(adapter_dir: Path) -> list[str]:
    """The export guard: the adapter file opens, holds LoRA A and B tensors, and none is empty."""
    from safetensors import safe_open

    path = Path(adapter_dir) / adapters.ADAPTER_WEIGHTS
    if not path.is_file():
        return [f"{path}: missing"]
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {key: f.get_slice(key).get_shape() for key in f.keys()}
    except Exception as err:  # safetensors raises its own error types for truncated/garbled files
        return [f"{path}: unreadable ({err})"]
    problems = []
    empty = [key for key, shape in shapes.items() if 0 in shape or not shape]
    if empty:
        problems.append(f"{path}: {len(empty)} empty tensors (e.g. {empty[0]}); a ZeRO-3 save without gathering?")
    if not any("lora_A" in k for k in shapes) or not any("lora_B" in k for k in shapes):
        problems.append(f"{path}: no lora_A/lora_B tensors")
    return problems


def verify(directory: Path) -> list[str]:
    """Every problem with a checkpoint directory; empty when it can be resumed from and registered."""
    directory = Path(directory)
    meta_path = directory / adapters.METADATA_FILE
    if not meta_path.is_file():
        return [f"{directory}: no {adapters.METADATA_FILE}"]
    try:
        meta = json.loads(meta_path.read_text())
        world_size = int(meta.get("world_size", 1))
    except (ValueError, TypeError) as err:
        return [f"{meta_path}: unreadable ({err})"]
    problems = _manifest_problems(directory, world_size)
    if "pack" in meta:
        # a packed trial's checkpoint (pipeline.pack_train): one ordinary checkpoint per config evaluated at this step
        for name in meta["pack"]["saved"]:
            problems += verify(directory / name)
        return problems
    return problems + adapter_problems(directory)


def _manifest_problems(directory: Path, world_size: int) -> list[str]:
    problems = []
    for rank in range(world_size):
        manifest = directory / manifest_file(rank)
        if not manifest.is_file():
            problems.append(f"{manifest}: missing")
            continue
        try:
            listed = json.loads(manifest.read_text())["files"]
            entries = [(str(name), int(entry["bytes"]), str(entry["sha256"])) for name, entry in listed.items()]
        except (ValueError, KeyError, TypeError, AttributeError) as err:  # cut short, garbled, or not ours
            problems.append(f"{manifest}: unreadable ({err.__class__.__name__}: {err})")
            continue
        for name, size, sha256 in entries:
            if Path(name).name != name or name in (".", ".."):
                problems.append(f"{manifest}: lists {name!r}, which is not a file of this checkpoint")
                continue
            path = directory / name
            if not path.is_file():
                problems.append(f"{path}: listed in {manifest.name} but missing")
            elif path.stat().st_size != size or _sha256(path) != sha256:
                problems.append(f"{path}: sha256 does not match {manifest.name}")
    return problems


def step_of(directory: Path) -> int:
    try:
        return int(adapters.read_metadata(directory).get("step", -1))
    except (OSError, ValueError):
        return -1


def choose_resume(latest: Path) -> tuple[Path, list[str]]:
    """The checkpoint a restarted trial continues from: `latest` if it verifies, else the newest older valid one.

    Returns (directory, problems of the checkpoints skipped). Raises `CheckpointError`
    when none verifies, rather than starting the trial over.
    """
    latest = Path(latest)
    siblings = [p for p in latest.parent.glob("checkpoint_*") if p.is_dir() and p != latest]
    latest_step = step_of(latest)
    older = sorted((p for p in siblings if step_of(p) <= latest_step or latest_step < 0), key=step_of, reverse=True)
    skipped: list[str] = []
    for candidate in [latest, *older]:
        problems = verify(candidate)
        if not problems:
            if skipped:
                log.warning("checkpoint fallback to %s; skipped: %s", candidate, "; ".join(skipped))
            return candidate, skipped
        skipped += problems
    raise CheckpointError(
        "no valid checkpoint to resume from, refusing to start the trial from scratch: " + "; ".join(skipped)
    )


TRAIN_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of a run's reported checkpoints


def repair_train_snapshot(store: Any, run_dir: str) -> list[str]:
    """Drop the checkpoints Ray Train's run snapshot names but storage no longer has; the names dropped.

    A checkpoint folder deleted by hand or by a storage lifecycle rule (fault F9) makes Ray
    refuse the whole run on restart (`CheckpointManagerInitializationError`: use a new run
    name or delete the run's folder, losing every checkpoint). Without those entries Ray
    resumes from the newest checkpoint still there. `store` is a `pipeline.storage.Storage`;
    the snapshot is rewritten in one write (atomic locally, one PUT on an object store).
    """
    path = f"{run_dir}/{TRAIN_SNAPSHOT}"
    if not store.exists(path):
        return []
    try:
        state = json.loads(store.read_text(path))
        results = state["checkpoint_results"]
        indices = state["checkpoint_report_indices"]
        gone = [r["checkpoint_dir_name"] for r in results if not store.exists(f"{run_dir}/{r['checkpoint_dir_name']}")]
    except (ValueError, KeyError, TypeError):
        return []  # not the layout this Ray writes: Ray's own check speaks for it
    if not gone:
        return []
    kept = [i for i, r in enumerate(results) if r["checkpoint_dir_name"] not in gone]
    state["checkpoint_results"] = [results[i] for i in kept]
    state["checkpoint_report_indices"] = [indices[i] for i in kept]
    pending = [(t, v) for t, v in zip(state.get("pending_training_results", []), state.get("pending_validation_specs", []))
               if t.get("checkpoint_dir_name") not in gone]
    state["pending_training_results"] = [t for t, _ in pending]
    state["pending_validation_specs"] = [v for _, v in pending]
    latest = state.get("latest_checkpoint_result")
    if latest is not None and latest.get("checkpoint_dir_name") in gone:
        # the newest report still on storage
        state["latest_checkpoint_result"] = (results[max(kept, key=lambda i: indices[i])] if kept else None)
    for key in ("validated_checkpoint_dir_names", "timed_out_validation_checkpoint_dir_names",
                "failed_validation_checkpoint_dir_names"):
        if isinstance(state.get(key), list):
            state[key] = [name for name in state[key] if name not in gone]
    store.write_text(path, json.dumps(state))
    left = state["latest_checkpoint_result"]
    log.warning("Ray Train's snapshot %s named %d checkpoint(s) no longer on storage (%s); %s", store.describe(path),
                len(gone), ", ".join(gone),
                f"the run resumes from {left['checkpoint_dir_name']}" if left else "none is left: the run starts over")
    return gone
