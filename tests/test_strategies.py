"""ZeRO-3 + CPU offload and QLoRA as swept trials: 2 Ray Train workers each, on MiniLM and a tiny causal LM.

Each saved adapter is loaded back in a single process with plain PEFT (no DeepSpeed,
no Ray) and must reproduce the metric the distributed trial reported for it: that is
the proof the ZeRO-3 save gathered the real weights, not the [0]-shaped shards.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline import checkpoint as ckpt
from pipeline.config import load_config
from pipeline.evaluate import score_adapter_dir
from pipeline.run import run_pipeline
from tests.support.configs import head_jsonl, minilm_config, write_yaml
from tests.test_causal import base_model_loss, causal_config

pytestmark = pytest.mark.slow

STRATEGIES = [{"kind": "zero3_offload"}, {"kind": "qlora", "compute_dtype": "float32"}]


def check_trials(result, config) -> None:
    metric = config.sweep.metric
    assert sorted(t.status for t in result.sweep.trials) == ["DONE", "DONE"]
    for trial in result.sweep.trials:
        trial_config = config.trial_config(trial.sampled)
        checkpoint_dir = Path(trial.best_checkpoint)
        assert ckpt.verify(checkpoint_dir) == []
        # both workers wrote their part: ZeRO-3's optimizer state is sharded, one file per rank
        assert {p.name for p in checkpoint_dir.glob("train_state.rank*")} == {"train_state.rank0.safetensors",
                                                                             "train_state.rank1.safetensors"}
        tensors = load_file(str(checkpoint_dir / "adapter_model.safetensors"))
        lora_b = [t for k, t in tensors.items() if "lora_B" in k]
        assert lora_b and all(t.numel() > 0 for t in tensors.values())
        assert any(float(t.abs().max()) > 0 for t in lora_b)  # B starts at zero: it trained
        reloaded = score_adapter_dir(checkpoint_dir, trial_config)
        assert reloaded[metric] == pytest.approx(trial.best_metric, rel=1e-4, abs=1e-6), trial_config.strategy.kind


@pytest.fixture(scope="module")
def ray_with_facts(tmp_path_factory):
    """A Ray instance whose Train workers record what their model is (tests/support/fault_hooks.py)."""
    import ray

    from tests.support.ray_cluster import start_local_ray

    facts = tmp_path_factory.mktemp("facts")
    start_local_ray(hooks=True, LORAFORGE_TEST_FACTS_DIR=str(facts))
    yield facts
    ray.shutdown()


def worker_facts(folder: Path, since: float) -> dict[str, list[dict]]:
    import json

    found: dict[str, list[dict]] = {}
    for path in sorted(folder.glob("*.json")):
        if path.stat().st_mtime >= since:
            fact = json.loads(path.read_text())
            found.setdefault(fact["kind"], []).append(fact)
    return found


def check_memory_strategies(facts: dict[str, list[dict]]) -> None:
    """Each of the 2 workers of each trial: the base in NF4 with double quantization (QLoRA); the base
    partitioned across the workers, the optimizer's fp32 master weights on the CPU (ZeRO-3 offload)."""
    assert sorted(f["rank"] for f in facts["qlora"]) == [0, 1]
    for fact in facts["qlora"]:
        assert fact["linear4bit"] > 0 and fact["with_quant_state"] == fact["linear4bit"] and fact["uint8_storage"]
        assert fact["quant_types"] == ["nf4"] and fact["double_quant"]
        assert fact["lora_on_4bit"] == fact["lora_layers"] > 0  # every adapted layer's base is a 4-bit layer
    assert sorted(f["rank"] for f in facts["zero3_offload"]) == [0, 1]
    for fact in facts["zero3_offload"]:
        assert fact["stage"] == 3 and fact["offload_optimizer"]
        assert fact["partitioned"] == fact["base_params"] > 0  # every frozen parameter is a ZeRO-3 shard
        # each worker holds about half of the base (DeepSpeed pads each shard a little)
        assert 0.45 * fact["base_numel"] <= fact["local_numel"] <= 0.55 * fact["base_numel"] + 1024 * fact["base_params"]
        assert fact["inner_optimizer"] == "DeepSpeedCPUAdam" and fact["fp32_master_devices"] == ["cpu"]


def test_strategies_swept_on_minilm(tmp_path: Path, sst2_small, ray_with_facts):
    import time

    began = time.time()
    config = load_config(write_yaml(tmp_path / "c.yaml", minilm_config(
        tmp_path, sst2_small, train={"num_workers": 2, "batch_size": 16, "eval_every_steps": 3, "lr": 3e-3},
        sweep={"parameters": {"strategy": {"grid": STRATEGIES}}},
    )), env={})
    result = run_pipeline(config)
    check_trials(result, config)
    assert {t.sampled["strategy"]["kind"] for t in result.sweep.trials} == {"zero3_offload", "qlora"}
    assert result.eval_metrics["eval_accuracy"] == pytest.approx(result.sweep.best.best_metric)
    check_memory_strategies(worker_facts(ray_with_facts, began))


def test_strategies_swept_on_a_tiny_causal_lm(tmp_path: Path, tiny_causal_model: Path, ray_with_facts):
    import time

    began = time.time()
    section = {"kind": "data_to_text",
               "train_path": str(head_jsonl("e2e/train.jsonl", tmp_path / "train.jsonl", 64)),
               "eval_path": str(head_jsonl("e2e/dev.jsonl", tmp_path / "eval.jsonl", 24))}
    raw = causal_config(tmp_path, tiny_causal_model, section, "tiny-strategies")
    raw["train"].update({"num_workers": 2, "epochs": 1, "eval_every_steps": 2})
    raw["sweep"]["parameters"] = {"strategy": {"grid": STRATEGIES}}
    config = load_config(write_yaml(tmp_path / "c.yaml", raw), env={})
    result = run_pipeline(config)
    check_trials(result, config)
    assert result.eval_metrics["eval_loss"] < base_model_loss(config) - 0.05
    torch.testing.assert_close(result.eval_metrics["eval_loss"], result.sweep.best.best_metric, rtol=1e-5, atol=0)
    check_memory_strategies(worker_facts(ray_with_facts, began))
