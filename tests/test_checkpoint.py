"""Checkpoints: state round-trips through safetensors, the manifest/adapter guard, and F8 (corrupt latest).

Checkpoints here are written by the train loop's own writer (`trial_worker.write_checkpoint`)
from a real PEFT model and optimizer, then damaged the ways fault F8 lists.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pipeline import adapters
from pipeline import checkpoint as ckpt
from pipeline.config import load_config
from pipeline.strategies import PlainLora, Worker
from pipeline.storage import Storage
from pipeline.sweep import best_complete_checkpoint as _best


def best_complete_checkpoint(run_dir: Path, metric: str, mode: str):
    found = _best(Storage.of(run_dir), str(run_dir), metric, mode)
    return (Path(found[0]), found[1]) if found else None
from pipeline.trial_worker import write_checkpoint
from tests.support.configs import minilm_config, write_yaml


@pytest.fixture(scope="module")
def trained(tmp_path_factory, sst2_small):
    """A PlainLora strategy after two real optimizer steps on MiniLM (so Adam has state)."""
    tmp = tmp_path_factory.mktemp("ckpt")
    config = load_config(write_yaml(tmp / "c.yaml", minilm_config(tmp, sst2_small, lora={"r": 2})), env={})
    torch.manual_seed(0)
    strategy = PlainLora(config, Worker())
    model, _ = strategy.wrap(strategy.load_model())
    inputs = {"input_ids": torch.tensor([[101, 2307, 3185, 102], [101, 6659, 3185, 102]]),
              "attention_mask": torch.ones(2, 4, dtype=torch.long), "labels": torch.tensor([1, 0])}
    for _ in range(2):
        strategy.backward(model(**inputs).loss)
        strategy.step()
    return strategy


def write(trained, directory: Path, step: int, accuracy: float, world_size: int = 1) -> Path:
    directory.mkdir(parents=True)
    write_checkpoint(directory, trained, 0, {"step": step, "metrics": {"eval_accuracy": accuracy}, "world_size": world_size})
    if world_size == 2:
        # rank 1 writes its state into its own directory; Ray merges both into one checkpoint
        other = directory.parent / f"{directory.name}-rank1"
        other.mkdir()
        ckpt.save_state(other / ckpt.state_file(1), {"optimizer": {}, "rng": torch.get_rng_state()})
        ckpt.write_manifest(other, 1)
        for path in other.iterdir():
            shutil.move(str(path), directory / path.name)
        other.rmdir()
    return directory


def test_optimizer_state_round_trips_through_safetensors_without_pickle(trained, tmp_path: Path):
    state = trained.optimizer_state()
    ckpt.save_state(tmp_path / "s.safetensors", {"optimizer": state, "rng": torch.get_rng_state()})
    loaded = ckpt.load_state(tmp_path / "s.safetensors")
    assert set(loaded["optimizer"]["state"]) == set(state["state"])  # int keys stay ints
    for key, value in state["state"].items():
        for name, tensor in value.items():
            assert torch.equal(loaded["optimizer"]["state"][key][name], tensor)
    assert loaded["optimizer"]["param_groups"][0]["betas"] == state["param_groups"][0]["betas"]
    # and the optimizer takes it back
    trained.load_optimizer_state(loaded["optimizer"])


@pytest.mark.parametrize("name", ["paged_adamw_32bit", "paged_adamw_8bit"])
def test_paged_adamw_state_survives_a_resume(tmp_path: Path, name: str):
    """Bad input #9's resume half: bitsandbytes' paged AdamW reloads its state and steps on identically.

    Two layers big enough for 8-bit states, whose quantization maps are one shared tensor.
    """
    from pipeline.strategies import torch_optimizer

    def net() -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 64))

    def run(resume_after: int | None) -> torch.Tensor:
        torch.manual_seed(0)
        model = net()
        optimizer = torch_optimizer(name, [{"params": list(model.parameters())}], lr=1e-2)
        for step in range(6):
            if step == resume_after:
                ckpt.save_state(tmp_path / "p.safetensors", {"optimizer": optimizer.state_dict(), "model": model.state_dict()})
                state = ckpt.load_state(tmp_path / "p.safetensors")
                model = net()
                model.load_state_dict(state["model"])
                optimizer = torch_optimizer(name, [{"params": list(model.parameters())}], lr=1e-2)
                optimizer.load_state_dict(state["optimizer"])
            torch.manual_seed(step)
            model(torch.randn(4, 64)).pow(2).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert torch.allclose(run(None), run(3), atol=1e-6)


def test_clean_checkpoint_verifies_and_loads_as_plain_peft(trained, tmp_path: Path):
    directory = write(trained, tmp_path / "checkpoint_000001", 5, 0.8, world_size=2)
    assert ckpt.verify(directory) == []
    assert {p.name for p in directory.iterdir()} >= {
        "adapter_model.safetensors", "adapter_config.json", "loraforge.json", "MANIFEST.rank0.json",
        "MANIFEST.rank1.json", "train_state.rank0.safetensors", "train_state.rank1.safetensors",
    }
    model = adapters.load_adapter_model(directory, trained.config.model, trained.config.data)
    expected = adapters.unwrap(trained.model).state_dict()
    for name, tensor in model.state_dict().items():
        if "lora_A" in name:
            assert torch.equal(tensor, expected[name])


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-100] ^= 0xFF
    path.write_bytes(bytes(raw))


def _empty_adapter(directory: Path) -> None:
    """A save from unguarded ZeRO-3: every tensor [0]-shaped, manifest written to match (so only the guard sees it)."""
    from safetensors.torch import load_file, save_file

    path = directory / adapters.ADAPTER_WEIGHTS
    save_file({k: torch.empty(0) for k in load_file(str(path))}, str(path))
    ckpt.write_manifest(directory, 0)


@pytest.mark.parametrize("damage, expected", [
    (lambda d: _truncate(d / adapters.ADAPTER_WEIGHTS), "sha256 does not match"),
    (lambda d: _flip(d / adapters.ADAPTER_WEIGHTS), "sha256 does not match"),
    (lambda d: (d / ckpt.state_file(1)).unlink(), "train_state.rank1.safetensors: listed in MANIFEST.rank1.json but missing"),
    (lambda d: (d / ckpt.manifest_file(1)).unlink(), "MANIFEST.rank1.json: missing"),
    (_empty_adapter, "empty tensors"),
    # a manifest cut short by a kill or a full disk is a problem the guard names, not a crash of the resume
    (lambda d: _truncate(d / ckpt.manifest_file(0)), "MANIFEST.rank0.json: unreadable (JSONDecodeError"),
    (lambda d: (d / ckpt.manifest_file(1)).write_text('{"rank": 1, "files": [1]}'), "MANIFEST.rank1.json: unreadable"),
    (lambda d: (d / ckpt.manifest_file(0)).write_text('{"rank": 0, "files": {"../../x": {"bytes": 1, "sha256": "0"}}}'),
     "not a file of this checkpoint"),
])
def test_corrupt_latest_checkpoint_falls_back_to_the_previous_valid_one(trained, tmp_path: Path, damage, expected):
    previous = write(trained, tmp_path / "checkpoint_000001", 5, 0.7, world_size=2)
    latest = write(trained, tmp_path / "checkpoint_000002", 10, 0.8, world_size=2)
    damage(latest)
    problems = ckpt.verify(latest)
    assert any(expected in p for p in problems), problems
    chosen, skipped = ckpt.choose_resume(latest)
    assert chosen == previous and skipped == problems
    # and registration never picks the damaged one, even though its metric is higher
    assert best_complete_checkpoint(tmp_path, "eval_accuracy", "max") == (previous, 0.7)

    # with nothing valid left, the trial fails loudly instead of starting from scratch
    _truncate(previous / adapters.ADAPTER_WEIGHTS)
    with pytest.raises(ckpt.CheckpointError, match="refusing to start the trial from scratch"):
        ckpt.choose_resume(latest)


def test_best_complete_checkpoint_prefers_later_ties_and_skips_half_written(trained, tmp_path: Path):
    first = write(trained, tmp_path / "checkpoint_1", 5, 0.80)
    write(trained, tmp_path / "checkpoint_2", 10, 0.70)
    half = write(trained, tmp_path / "checkpoint_3", 15, 0.99)
    (half / "adapter_config.json").unlink()  # killed mid-copy
    assert best_complete_checkpoint(tmp_path, "eval_accuracy", "max") == (first, 0.80)
    assert best_complete_checkpoint(tmp_path, "eval_accuracy", "min")[1] == 0.70
    tie = write(trained, tmp_path / "checkpoint_4", 20, 0.80)
    assert best_complete_checkpoint(tmp_path, "eval_accuracy", "max") == (tie, 0.80)
    assert best_complete_checkpoint(tmp_path / "none", "eval_accuracy", "max") is None
    assert json.loads((tie / "loraforge.json").read_text())["step"] == 20
