"""pipeline.adapters on real MiniLM: LoRA attached as a no-op, scaled by alpha/r (or rsLoRA), saved as safetensors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline import adapters
from pipeline.config import load_config
from tests.support.configs import minilm_config, write_yaml


@pytest.fixture(scope="module")
def minilm_cfg(tmp_path_factory, sst2_small):
    tmp = tmp_path_factory.mktemp("units")
    return load_config(write_yaml(tmp / "c.yaml", minilm_config(tmp, sst2_small)), env={})


def test_lora_init_is_a_no_op_and_only_adapters_and_head_train(minilm_cfg):
    torch.manual_seed(0)
    base = adapters.load_base_model(minilm_cfg.model, minilm_cfg.data)
    inputs = {"input_ids": torch.tensor([[101, 2023, 3185, 2001, 2307, 102]])}
    base.eval()
    before = base(**inputs).logits.detach().clone()
    model = adapters.attach_lora(base, minilm_cfg.lora, minilm_cfg.data)
    model.eval()
    # B is zero at init, so W0 + (alpha/r)·B·A == W0
    assert torch.allclose(model(**inputs).logits, before, atol=1e-6)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "modules_to_save" in n for n in trainable)
    assert any("classifier" in n for n in trainable) and any("pooler" in n for n in trainable)
    assert adapters.trainable_parameters(model) == model.get_nb_trainable_parameters()[0]
    lora_a = [p for n, p in model.named_parameters() if "lora_A" in n][0]
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n][0]
    assert lora_a.abs().sum() > 0 and lora_b.abs().sum() == 0


@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_update_is_scaled_by_alpha_over_r_or_over_sqrt_r_with_rslora(minilm_cfg, use_rslora: bool):
    """W x + s * B A x with s = alpha/r, or alpha/sqrt(r) under rsLoRA, computed here from the weights."""
    import math

    spec = minilm_cfg.lora.model_copy(update={"r": 4, "alpha": 8, "dropout": 0.0, "use_rslora": use_rslora})
    torch.manual_seed(0)
    model = adapters.attach_lora(adapters.load_base_model(minilm_cfg.model, minilm_cfg.data), spec, minilm_cfg.data)
    model.eval()
    layer = model.base_model.model.bert.encoder.layer[0].attention.self.query
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.1)
    scale = spec.alpha / (math.sqrt(spec.r) if use_rslora else spec.r)
    x = torch.randn(3, layer.in_features)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = torch.nn.functional.linear(x, layer.base_layer.weight, layer.base_layer.bias) + scale * (x @ a.T @ b.T)
    with torch.no_grad():
        assert torch.allclose(layer(x), expected, atol=1e-5)
    assert layer.scaling["default"] == pytest.approx(scale)


def test_saved_adapter_is_safetensors_and_reloads_with_plain_peft(minilm_cfg, tmp_path: Path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = adapters.attach_lora(adapters.load_base_model(minilm_cfg.model, minilm_cfg.data), minilm_cfg.lora, minilm_cfg.data)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)  # as if trained
    model.eval()
    inputs = {"input_ids": torch.tensor([[101, 2023, 3185, 2001, 2307, 102]])}
    expected = model(**inputs).logits
    out = adapters.save_adapter(model, tmp_path / "adapter", {"task": "classification"})
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                                     "loraforge.json"]
    # a user with only transformers + peft: a fresh base (new random head) + the adapter folder
    torch.manual_seed(123)
    base = AutoModelForSequenceClassification.from_pretrained(minilm_cfg.model.resolve(), num_labels=2)
    reloaded = PeftModel.from_pretrained(base, str(out))
    reloaded.eval()
    assert torch.allclose(reloaded(**inputs).logits, expected, atol=1e-5)
