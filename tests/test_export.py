"""Merge/export: adapters folded into a full-precision base agree with the unmerged model; unmerge restores W0."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline import adapters, export, strategies
from pipeline.config import load_config
from pipeline.strategies import Worker, strategy_for
from tests.support.configs import minilm_config, write_yaml


def train_adapter(config, out: Path, steps: int = 6) -> Path:
    """A few real optimizer steps with the strategy's own code path, saved as the trials save."""
    from pipeline import data

    torch.manual_seed(0)
    strategy = strategy_for(config, Worker())
    model, _ = strategy.wrap(strategy.load_model())
    tokenizer = adapters.load_tokenizer(config.model, config.data)
    examples = data.tokenize_rows(config.data, data.load_split(config.data, "train"), tokenizer)
    for i in range(steps):
        batch = data.collate(examples[i * 16 : (i + 1) * 16], tokenizer.pad_token_id)
        strategy.backward(model(**batch).loss)
        strategy.step()
    strategy.save_adapter(out, {"step": steps})
    return out


@pytest.mark.parametrize("strategy, tolerance", [
    ({"kind": "lora"}, 1e-4),
    # merged into the dequantized NF4 weights, the adapter computes what it computed in training
    ({"kind": "qlora", "compute_dtype": "float32"}, 1e-4),
])
def test_merged_model_matches_unmerged_outputs(tmp_path: Path, sst2_small, strategy: dict, tolerance: float):
    config = load_config(write_yaml(tmp_path / "c.yaml", minilm_config(
        tmp_path, sst2_small, strategy=strategy, lora={"r": 8, "alpha": 32, "dropout": 0.0})), env={})
    adapter_dir = train_adapter(config, tmp_path / "adapter")
    report = export.merge(adapter_dir, config, tmp_path / "merged")
    assert report.quantized_base == (strategy["kind"] == "qlora")
    assert report.max_abs_diff < tolerance
    assert json.loads((tmp_path / "merged" / export.REPORT_FILE).read_text())["max_abs_diff"] == report.max_abs_diff

    # the merged folder is a plain transformers model: no PEFT, no bitsandbytes, safetensors only
    from transformers import AutoModelForSequenceClassification

    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert not list((tmp_path / "merged").glob("*.bin"))
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged", use_safetensors=True)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    tokenizer = adapters.load_tokenizer(config.model, config.data)
    batch = export.sample_batch(config, tokenizer)
    base_out = export.logits(adapters.load_base_model(config.model, config.data), batch)
    unmerged = export.logits(adapters.load_adapter_model(adapter_dir, config.model, config.data,
                                                           base=strategies.inference_base(config)), batch)
    merged_out = export.logits(merged, batch)
    assert float((merged_out - unmerged).abs().max()) < tolerance
    # and the adapter matters far more than the merge error (the comparison could fail)
    assert float((unmerged - base_out).abs().max()) > 20 * report.max_abs_diff


def test_merge_then_unmerge_restores_the_base_weights(tmp_path: Path, sst2_small):
    config = load_config(write_yaml(tmp_path / "c.yaml", minilm_config(tmp_path, sst2_small)), env={})
    adapter_dir = train_adapter(config, tmp_path / "adapter", steps=3)
    model = adapters.load_adapter_model(adapter_dir, config.model, config.data)
    layer = model.base_model.model.bert.encoder.layer[0].attention.self.query
    w0 = layer.base_layer.weight.detach().clone()
    model.merge_adapter()
    delta = layer.base_layer.weight.detach() - w0
    lora = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * layer.scaling["default"]
    assert torch.allclose(delta, lora, atol=1e-6) and delta.abs().max() > 0  # W = W0 + (alpha/r)·B·A
    model.unmerge_adapter()
    assert torch.allclose(layer.base_layer.weight, w0, atol=1e-6)
