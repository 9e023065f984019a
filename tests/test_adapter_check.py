"""pipeline/eval/applied.py: an adapter that changes nothing is caught before it is scored.

On a 2-layer Llama (tests/conftest.py tiny_causal_model), loaded the way the eval stage loads it
(`strategies.load_trained`): a trained-like adapter passes; an adapter saved straight after
initialisation (every B zero), one whose A is zero (B·A = 0 with B not zero), the bare base, and a
merge that does not reproduce the unmerged model each fail with the reason. The stage itself, the
registered version and `promote` are in tests/test_registry.py (test_an_adapter_that_changes_nothing_...).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline import adapters, export, strategies
from pipeline.config import load_config
from pipeline.eval import applied
from tests.support.configs import e2e_config, save_adapter, write_yaml


@pytest.fixture(scope="module")
def config(tmp_path_factory, tiny_causal_model: Path):
    tmp = tmp_path_factory.mktemp("adapter-check")
    return load_config(write_yaml(tmp / "c.yaml", e2e_config(tmp, str(tiny_causal_model))), env={})


def edited(adapter: Path, out: Path, change) -> Path:
    """A copy of `adapter` with its tensors passed through `change(name, tensor)`."""
    out.mkdir(parents=True, exist_ok=True)
    for item in adapter.iterdir():
        (out / item.name).write_bytes(item.read_bytes())
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    save_file({name: change(name, t) for name, t in weights.items()}, str(out / "adapter_model.safetensors"))
    return out


def check(config, adapter: Path) -> applied.AdapterCheck:
    model = strategies.load_trained(config, adapter)
    return applied.check(config, model, adapters.load_tokenizer(config.model, config.data), adapter)


def test_a_trained_adapter_changes_the_logits_and_merges_to_the_same_model(config, tmp_path: Path):
    found = check(config, save_adapter(config, tmp_path / "adapter"))
    assert found.ok and found.reason is None, found
    assert found.lora_layers == 4 and found.zero_b_layers == 0 and found.probes == applied.PROBES
    assert found.effect > 1e-3 and found.merge_diff < applied.MAX_MERGE_DIFF


def test_an_adapter_saved_at_initialisation_fails_every_b_zero(config, tmp_path: Path):
    torch.manual_seed(0)
    model = adapters.attach_lora(adapters.load_base_model(config.model, config.data), config.lora, config.data)
    empty = adapters.save_adapter(model, tmp_path / "empty", {"test": True})  # B is zero at init
    found = check(config, empty)
    assert not found.ok and found.zero_b_layers == found.lora_layers == 4
    assert "every lora_B of its 4 LoRA layers is zero" in found.reason and str(empty) in found.reason


def test_b_times_a_zero_fails_on_the_logits(config, tmp_path: Path):
    trained = save_adapter(config, tmp_path / "adapter")
    no_a = edited(trained, tmp_path / "no_a", lambda name, t: torch.zeros_like(t) if "lora_A" in name else t)
    found = check(config, no_a)
    assert not found.ok and found.zero_b_layers == 0
    assert "does not change the model" in found.reason and found.effect == 0.0


def test_the_bare_base_and_a_broken_merge_fail(config, tmp_path: Path, monkeypatch):
    trained = save_adapter(config, tmp_path / "adapter")
    tokenizer = adapters.load_tokenizer(config.model, config.data)
    bare = applied.check(config, strategies.load_trained(config, None), tokenizer, trained)
    assert not bare.ok and "no adapter is attached" in bare.reason

    # a merge that loses the update (as merging into requantized 4-bit weights can): the parity check sees it
    def lossy(config, model, adapter_dir):
        import copy

        return copy.deepcopy(model).unload()

    monkeypatch.setattr(applied, "merged_copy", lossy)
    found = check(config, trained)
    assert not found.ok and "merged into its base" in found.reason and found.merge_diff > applied.MAX_MERGE_DIFF


def test_the_base_of_a_classifier_is_the_same_in_every_run_and_follows_the_seed(tmp_path: Path, sst2_small):
    """The base row: MiniLM with a new, untrained head drawn from train.seed (it was unseeded: base accuracy moved
    between 0.487 and 0.522 across four evaluations of one version). The caller's random state is untouched."""
    from pipeline.config import ExperimentConfig
    from tests.support.configs import minilm_config

    config = ExperimentConfig.model_validate(minilm_config(tmp_path, sst2_small))
    tokenizer = adapters.load_tokenizer(config.model, config.data)
    batch = export.sample_batch(config, tokenizer, 8)
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    first = export.logits(strategies.load_trained(config, None), batch)
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.manual_seed(999)  # whatever the process drew before
    again = export.logits(strategies.load_trained(config, None), batch)
    assert torch.equal(first, again)
    other_seed = config.model_copy(update={"train": config.train.model_copy(update={"seed": 1})})
    assert not torch.equal(first, export.logits(strategies.load_trained(other_seed, None), batch))
