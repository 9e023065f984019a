"""Pure pieces: batching, collation, prompt masking, metrics; LoRA attach/save/load on real MiniLM."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score

from pipeline import adapters, benchmarks, data
from pipeline.config import DataToTextData, InstructionData, load_config
from tests.conftest import head_jsonl, minilm_config, write_yaml


def test_make_batches_covers_every_index_once_and_buckets_by_length():
    rng = random.Random(1)
    lengths = [rng.randint(3, 60) for _ in range(1000)]
    batches = data.make_batches(lengths, 32, shuffle=True, seed=0, bucketing=True)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(1000))
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    random_batches = data.make_batches(lengths, 32, shuffle=True, seed=0, bucketing=False)
    padded_random = sum(len(b) * max(lengths[i] for i in b) for b in random_batches)
    assert padded < 0.7 * padded_random  # bucketing is what makes CPU training ~2x faster
    # the batch order is shuffled, not sorted by length
    assert [max(lengths[i] for i in b) for b in batches] != sorted(max(lengths[i] for i in b) for b in batches)


def test_make_batches_gives_every_rank_the_same_count_and_disjoint_data():
    lengths = list(range(103))
    shards = [data.make_batches(lengths, 8, shuffle=True, seed=3, bucketing=True, rank=r, world_size=3) for r in range(3)]
    assert len({len(s) for s in shards}) == 1
    seen = [i for s in shards for b in s for i in b]
    assert len(seen) == len(set(seen))
    assert data.steps_per_epoch(103, 8, 1, 3) == len(shards[0])


def test_collate_pads_and_masks_token_labels():
    examples = [data.Example([5, 6, 7], [-100, 6, 7], 3), data.Example([8], [8], 1)]
    batch = data.collate(examples, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    cls = data.collate([data.Example([1, 2], 1, 2), data.Example([3], 0, 1)], pad_token_id=0)
    assert cls["labels"].tolist() == [1, 0]


def test_instruction_and_data_to_text_mask_the_prompt(tiny_causal_model: Path, tmp_path: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_causal_model)
    spec = InstructionData(kind="instruction", train_path=tmp_path / "t.jsonl", eval_path=tmp_path / "e.jsonl",
                           max_seq_len=256)
    row = {"instruction": "Add two numbers.", "input": "2 and 3", "output": "5"}
    (example,) = data.tokenize_rows(spec, [row], tokenizer)
    prompt_len = sum(label == data.IGNORE_INDEX for label in example.labels)
    assert "### Response:" in tokenizer.decode(example.input_ids[:prompt_len])
    assert tokenizer.decode([t for t in example.labels if t != data.IGNORE_INDEX]) == "5</s>"
    assert "### Input:\n2 and 3" in tokenizer.decode(example.input_ids)
    (no_input,) = data.tokenize_rows(spec, [{**row, "input": ""}], tokenizer)
    assert "### Input" not in tokenizer.decode(no_input.input_ids)

    spec = DataToTextData(kind="data_to_text", train_path=tmp_path / "t.jsonl", eval_path=tmp_path / "e.jsonl")
    (example,) = data.tokenize_rows(spec, [{"mr": "name[The Eagle]", "ref": "The Eagle is a pub."}], tokenizer)
    target = tokenizer.decode([t for t in example.labels if t != data.IGNORE_INDEX])
    assert target == "The Eagle is a pub.</s>"


def test_classification_metrics_match_sklearn():
    rng = random.Random(0)
    labels = torch.tensor([rng.randint(0, 2) for _ in range(500)])
    preds = torch.tensor([rng.randint(0, 2) for _ in range(500)])
    metrics = benchmarks.classification_metrics(benchmarks.confusion_matrix(preds, labels, 3))
    assert metrics["accuracy"] == pytest.approx(accuracy_score(labels, preds))
    assert metrics["f1_macro"] == pytest.approx(f1_score(labels, preds, average="macro"))
    binary = benchmarks.classification_metrics(benchmarks.confusion_matrix(preds % 2, labels % 2, 2))
    assert binary["f1"] == pytest.approx(f1_score(labels % 2, preds % 2))
    with pytest.raises(ValueError):
        benchmarks.classification_metrics(torch.zeros(2, 2))


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
    base = AutoModelForSequenceClassification.from_pretrained(minilm_cfg.model.path, num_labels=2)
    reloaded = PeftModel.from_pretrained(base, str(out))
    reloaded.eval()
    assert torch.allclose(reloaded(**inputs).logits, expected, atol=1e-5)


def test_rank_plots_average_seeds_after_taking_each_seeds_best_lr(tmp_path: Path):
    from pipeline import report

    rows = [
        {"targets": "q+v", "r": 8, "seed": 0, "lr": 1e-3, "acc": 0.80},
        {"targets": "q+v", "r": 8, "seed": 0, "lr": 3e-3, "acc": 0.84},
        {"targets": "q+v", "r": 8, "seed": 1, "lr": 1e-3, "acc": 0.82},
        {"targets": "q+v", "r": 8, "seed": 1, "lr": 3e-3, "acc": None},
        {"targets": "q+v", "r": 2, "seed": 0, "lr": 1e-3, "acc": 0.70},
    ]
    assert report._by_seed(rows, "acc", "max") == {("q+v", 8): {0: 0.84, 1: 0.82}, ("q+v", 2): {0: 0.70}}
    assert report._mean_by(rows, "acc", "max") == pytest.approx({("q+v", 8): 0.83, ("q+v", 2): 0.70})
    assert report._mean_by(rows, "acc", "min")[("q+v", 8)] == pytest.approx(0.81)
    for plot in (report.metric_vs_rank_png, report.rank_targets_heatmap_png):
        path = plot(rows, "acc", "max", tmp_path / f"{plot.__name__}.png")
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
