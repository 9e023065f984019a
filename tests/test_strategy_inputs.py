"""Bad inputs #5-10 for the memory strategies: rejected (or warned about) before any worker starts."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from pipeline import preflight, strategies, sweep
from pipeline.config import ConfigError, load_config
from tests.support.configs import minilm_config, write_yaml


@pytest.fixture()
def base(tmp_path: Path, sst2_small) -> dict:
    return minilm_config(tmp_path, sst2_small)


def load(tmp_path: Path, config: dict, overrides: list[str]):
    return load_config(write_yaml(tmp_path / "c.yaml", config), overrides, env={})


def problems(tmp_path: Path, config: dict, overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, config, overrides)
    return str(info.value)


@pytest.mark.parametrize(("overrides", "expected"), [
    # 7: ZeRO-3 + 4-bit must store the packed weights in ZeRO's dtype
    (["strategy={kind: zero3_offload, precision: bf16, load_in_4bit: {quant_storage: uint8}}"],
     "strategy.load_in_4bit.quant_storage=uint8 cannot be sharded by ZeRO-3 with precision=bf16: "
     "set strategy.load_in_4bit.quant_storage: bfloat16"),
    (["strategy={kind: zero3_offload, load_in_4bit: {quant_storage: bfloat16}}"],
     "strategy.precision must be set explicitly"),
    # 8: the empty-adapter trap
    (["strategy={kind: zero3_offload, gather_16bit_weights_on_model_save: false}"],
     "strategy.gather_16bit_weights_on_model_save must be true: with it off ZeRO-3 saves empty adapters"),
    # 9: bitsandbytes' paged optimizers under DeepSpeed
    (["strategy={kind: zero3_offload}", "train.optimizer=paged_adamw_8bit"],
     "train.optimizer=paged_adamw_8bit cannot run under DeepSpeed ZeRO-3"),
    (["strategy={kind: qlora, quant_type: nf5}"], "strategy.quant_type: Input should be 'nf4' or 'fp4'"),
    (["strategy={kind: zero4}"], "strategy: Input tag 'zero4' found using 'kind' does not match any of the expected tags"),
    (["strategy={kind: qlora, offload_param: true}"], "strategy.offload_param: unknown key"),
])
def test_impossible_strategy_combinations_are_rejected_at_load(tmp_path: Path, base: dict, overrides, expected):
    message = problems(tmp_path, base, overrides)
    assert expected in message, message


def test_strategy_is_sweepable(tmp_path: Path, base: dict):
    base["sweep"] = {"searcher": "grid", "scheduler": "fifo", "parameters": {
        "strategy.kind": {"grid": ["lora", "zero3_offload", "qlora"]}}}
    config = load(tmp_path, base, [])
    assert [c.strategy.kind for c in sweep.candidate_configs(config)] == ["lora", "zero3_offload", "qlora"]
    base["sweep"]["parameters"] = {"strategy.kind": {"grid": ["lora", "zero2"]}}
    assert "sweep.parameters.strategy.kind: value 'zero2'" in problems(tmp_path, base, [])


def test_cpu_qlora_is_allowed_with_a_warning_and_fp16_zero3_warns(tmp_path: Path, base: dict, caplog):
    config = load(tmp_path, base, ["strategy={kind: qlora}"])
    found, warnings = preflight.check_strategies([config])
    assert found == []  # bitsandbytes 0.50 quantizes and dequantizes NF4 on this CPU (probed for real)
    assert any("4-bit base on CPU" in w and "slow" in w for w in warnings)
    with caplog.at_level(logging.WARNING, logger="loraforge"):
        preflight.check(config, [config])
    assert "4-bit base on CPU" in caplog.text

    config = load(tmp_path, base, ["strategy={kind: zero3_offload, precision: fp16}"])
    found, warnings = preflight.check_strategies([config])
    assert any("fp16 under ZeRO-3" in w and "skipped_steps" in w for w in warnings)


def test_missing_or_old_libraries_are_named_with_the_install_line():
    assert preflight._version_problem("bitsandbytes", "0.43.3", "qlora") is None
    old = preflight._version_problem("bitsandbytes", "99.0", "strategy.kind=qlora")
    assert old.startswith("strategy.kind=qlora needs bitsandbytes>=99.0, found 0.") and "pip install -U" in old
    missing = preflight._version_problem("no-such-quantizer", "1.0", "strategy.kind=qlora")
    assert "not installed" in missing and "loraforge[memory]" in missing
    # a device this install cannot quantize on (this machine has no CUDA)
    if not torch.cuda.is_available():
        assert "cannot do 4-bit NF4 on cuda" in preflight._four_bit_problem("cuda")


def test_precision_follows_the_hardware(tmp_path: Path, base: dict):
    """Bad input #10's CPU half: auto picks fp32 on CPU; DeepSpeed's batch fields come from one source."""
    config = load(tmp_path, base, ["strategy={kind: zero3_offload}", "train.batch_size=8", "train.grad_accum=4"])
    assert strategies.zero3_precision(config.strategy, torch.device("cpu")) == "fp32"
    ds = strategies.deepspeed_config(config, world_size=2, precision="fp32")
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (64, 8, 4)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]


def test_all_linear_targets_pass_preflight(tmp_path: Path, base: dict):
    config = load(tmp_path, base, ["lora.target_modules=[all-linear]", "strategy={kind: qlora}"])
    assert preflight.check_targets(config, [config]) == []
    config = load(tmp_path, base, ["lora.target_modules=[all-linear, query]"])
    assert "'all-linear' stands alone" in preflight.check_targets(config, [config])[0]
