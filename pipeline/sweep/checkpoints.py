"""Where a trial's Train runs and checkpoints are on storage, and which checkpoint is its best complete one."""

from __future__ import annotations

from pathlib import Path

from pipeline import adapters
from pipeline import checkpoint as ckpt
from pipeline.storage import Storage


def complete(checkpoint_dir: Path) -> bool:
    return not ckpt.verify(checkpoint_dir)


def trained_epochs(store: Storage, run_dir: str) -> float:
    """How many epochs the newest complete checkpoint of a Train run had trained (0 if none)."""
    epochs = [adapters.read_metadata(local).get("metrics", {}).get("epoch", 0.0)
              for local in map(store.local, store.dirs(run_dir, "checkpoint_*")) if complete(local)]
    return max(epochs, default=0.0)


def best_complete_checkpoint(store: Storage, run_dir: str, metric: str, mode: str,
                             member: str | None = None) -> tuple[str, float] | None:
    """The best checkpoint of a Train run (a path on `store`) whose files are all there, by the metric
    saved inside it; of a packed trial, the best of config `member` (its subfolders)."""
    scored = []
    for checkpoint_dir in store.dirs(run_dir, "checkpoint_*"):
        if member is not None:
            if not store.exists(checkpoint_dir := f"{checkpoint_dir}/{member}"):
                continue
        local = store.local(checkpoint_dir)
        if complete(local):
            value = adapters.read_metadata(local).get("metrics", {}).get(metric)
            if value is not None:
                scored.append((checkpoint_dir, float(value)))
    if not scored:
        return None
    return (max if mode == "max" else min)(reversed(scored), key=lambda item: item[1])


PBT_DIR = "pbt"
PBT_ORIGIN = "origin.json"  # beside a PBT copy: the trial, checkpoint and result it was copied from


def train_run_dir(train_storage_path: Path, trial_id: str) -> tuple[Path, Path | None]:
    """(the Ray Train run a trial trains in now, the checkpoint that run starts from or None).

    A trial's first Train run is `train-<trial id>`. Each time PBT makes it copy a better
    trial, the driver puts a copy of that trial's checkpoint in `pbt/train-<trial id>-pbt<n>/`
    and the trial continues in a new Train run of that name. Everything derives from
    storage, so a paused, restarted or `--resume`d trial finds its current run.
    """
    copies = [c for c in (train_storage_path / PBT_DIR).glob(f"train-{trial_id}-pbt*/checkpoint_*")
              if pbt_generation(c.parent.name)]
    # the newest generation whose copy is complete (a copy is verified only when it is the candidate)
    latest = next((c for c in sorted(copies, key=lambda c: pbt_generation(c.parent.name), reverse=True)
                   if complete(c)), None)
    if latest is None:
        return train_storage_path / f"train-{trial_id}", None
    return train_storage_path / latest.parent.name, latest


def trial_run_path(store: Storage, train_storage_path: str, trial_id: str) -> str:
    """`train_run_dir`'s Train run as a path on `store` (PBT, which moves trials, needs local storage)."""
    if store.remote:
        return f"{train_storage_path}/train-{trial_id}"
    return str(train_run_dir(Path(train_storage_path), trial_id)[0])


def pbt_generation(run_name: str) -> int:
    """n of `train-<trial id>-pbt<n>`; 0 for a trial's first Train run (or a staging dir)."""
    suffix = run_name.rsplit("-pbt", 1)[1] if "-pbt" in run_name else ""
    return int(suffix) if suffix.isdigit() else 0
