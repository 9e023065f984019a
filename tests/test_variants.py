"""LoRA variants as config fields and sweep axes: DoRA, PEFT's inits, LoRA+, the mlp preset.

Each variant is attached to a real model, trained a few steps with the optimizer the strategies build,
saved as loraforge saves checkpoints, and reloaded with plain PEFT onto the original base: the reloaded
model gives the trained model's outputs. Bad combinations exit 2 before any worker."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline import adapters, data, strategies
from pipeline.config import ConfigError, load_config
from tests.support.configs import write_yaml

ALPACA_ROWS = 24


@pytest.fixture(scope="module")
def tiny_rows(tmp_path_factory) -> Path:
    from tests.support.configs import head_jsonl

    tmp = tmp_path_factory.mktemp("variants")
    return head_jsonl("alpaca/train.jsonl", tmp / "rows.jsonl", ALPACA_ROWS)


def tiny_config(tmp_path: Path, model: Path, rows: Path, lora: dict, **sections):
    raw = {"name": "variants", "model": {"name_or_path": str(model)},
           "data": {"kind": "instruction", "train_path": str(rows), "eval_path": str(rows), "max_seq_len": 96,
                    "max_truncated_fraction": 1.0},
           "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "attention_mlp", **lora},
           "train": {"lr": 5e-3, "batch_size": 4},
           "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'm.db'}"}, "ray": {"storage_path": str(tmp_path / "r")},
           **sections}
    return load_config(write_yaml(tmp_path / "c.yaml", raw), env={})


def batches(config, n: int = 3) -> list[dict[str, torch.Tensor]]:
    tokenizer = adapters.load_tokenizer(config.model, config.data)
    examples = data.tokenize_rows(config.data, data.load_split(config.data, "train"), tokenizer)
    return [data.collate(examples[i * 4:(i + 1) * 4], tokenizer.pad_token_id) for i in range(n)]


def train_a_few_steps(config, steps: int = 4):
    """attach -> (eva init) -> `steps` AdamW steps with the strategies' optimizer: (model, optimizer, batches)."""
    torch.manual_seed(0)
    model = adapters.attach_lora(adapters.load_base_model(config.model, config.data), config.lora, config.data)
    chunks = batches(config)
    if config.lora.init == "eva":
        adapters.eva_init(model, chunks)
    optimizer = strategies.adapter_optimizer(model, config)
    model.train()
    for step in range(steps):
        loss = model(**chunks[step % len(chunks)]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return model, optimizer, chunks


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


VARIANTS = {
    "dora": {"use_dora": True},
    "loraplus": {"loraplus_lr_ratio": 16.0},
    "gaussian": {"init": "gaussian"},
    "orthogonal": {"init": "orthogonal"},
    "eva": {"init": "eva"},
    "pissa": {"init": "pissa"},
    "pissa_niter": {"init": "pissa_niter_4"},
    "olora": {"init": "olora"},
    "dora_rslora_mlp": {"use_dora": True, "use_rslora": True, "target_modules": "mlp"},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_variant_trains_and_its_saved_adapter_reloads_with_plain_peft(variant: str, tmp_path: Path,
                                                                        tiny_causal_model: Path, tiny_rows: Path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    config = tiny_config(tmp_path, tiny_causal_model, tiny_rows, VARIANTS[variant])
    model, optimizer, chunks = train_a_few_steps(config)
    expected = logits(model, chunks[0])
    folder = adapters.save_adapter(model, tmp_path / "adapter", {"task": "instruction"})

    saved = json.loads((folder / "adapter_config.json").read_text())
    weights = load_file(str(folder / adapters.ADAPTER_WEIGHTS))
    assert saved["use_dora"] == config.lora.use_dora and saved["use_rslora"] == config.lora.use_rslora
    if config.lora.use_dora:  # DoRA's trained magnitudes travel with the adapter
        magnitudes = [k for k in weights if "lora_magnitude_vector" in k]
        assert magnitudes and all(weights[k].ndim == 1 for k in magnitudes)
    if config.lora.rewrites_base:
        # converted for the original base: rank 2r, default init; the residual-base tensors kept for a resume
        assert saved["r"] == 2 * config.lora.r and saved["init_lora_weights"] is True
        assert (folder / adapters.RESIDUAL_WEIGHTS).is_file()
    else:
        assert saved["r"] == config.lora.r and not (folder / adapters.RESIDUAL_WEIGHTS).exists()
    if variant == "dora_rslora_mlp":
        wrapped = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in weights if "lora_A" in k}
        assert wrapped == {"gate_proj", "up_proj", "down_proj"}
    if config.lora.loraplus_lr_ratio:  # PEFT's LoRA+ groups: B (and 1-d parameters) at 16x train.lr
        by_lr = {g["lr"]: len(g["params"]) for g in optimizer.param_groups if g["params"]}
        assert by_lr.keys() == {config.train.lr, 16 * config.train.lr}
        b_params = {id(p) for n, p in model.named_parameters() if "lora_B" in n}
        fast = {id(p) for g in optimizer.param_groups if g["lr"] == 16 * config.train.lr for p in g["params"]}
        assert b_params and b_params <= fast
        assert not fast & {id(p) for n, p in model.named_parameters() if "lora_A" in n}

    # the original, untouched base + the folder, with plain transformers + PEFT
    base = AutoModelForCausalLM.from_pretrained(str(tiny_causal_model), dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, str(folder)).eval()
    torch.testing.assert_close(logits(reloaded, chunks[0]), expected, rtol=1e-4, atol=1e-4)
    # training moved the model away from its base (an init that starts at the base's own output included)
    with reloaded.disable_adapter():
        assert (logits(reloaded, chunks[0]) - expected).abs().max() > 1e-3

    # a resumed run rebuilds the model from the config and loads the checkpoint (the residual tensors after
    # pissa and olora, whose init rewrites the base the same way again)
    torch.manual_seed(0)
    again = adapters.attach_lora(adapters.load_base_model(config.model, config.data), config.lora, config.data)
    adapters.load_adapter_weights(again, folder)
    torch.testing.assert_close(logits(again.eval(), chunks[0]), expected, rtol=1e-4, atol=1e-4)


def test_the_mlp_preset_adapts_the_feed_forward_layers_only(tmp_path: Path, tiny_causal_model: Path, tiny_rows: Path,
                                                            sst2_small):
    from tests.support.configs import minilm_config

    llama = tiny_config(tmp_path, tiny_causal_model, tiny_rows, {"target_modules": "mlp"})
    model = adapters.attach_lora(adapters.load_base_model(llama.model, llama.data), llama.lora, llama.data)
    wrapped = {n.split(".lora_A")[0] for n, _ in model.named_parameters() if "lora_A" in n}
    assert {w.rsplit(".", 1)[-1] for w in wrapped} == {"gate_proj", "up_proj", "down_proj"} and len(wrapped) == 6

    # BERT: intermediate.dense and the layer's output.dense, not the attention's output.dense
    raw = minilm_config(tmp_path, sst2_small)
    raw["lora"]["target_modules"] = "mlp"
    bert = load_config(write_yaml(tmp_path / "m.yaml", raw), env={})
    from pipeline import preflight

    assert preflight.check_targets(bert, [bert]) == []
    model = adapters.attach_lora(adapters.load_base_model(bert.model, bert.data), bert.lora, bert.data)
    wrapped = {n.split(".lora_A")[0] for n, _ in model.named_parameters() if "lora_A" in n}
    assert len(wrapped) == 12 and not any("attention" in w for w in wrapped)
    assert {w.split(".layer.")[1].split(".", 1)[1] for w in wrapped} == {"intermediate.dense", "output.dense"}


def test_an_mlp_preset_on_an_architecture_without_one_names_the_modules_to_list(tmp_path: Path, tiny_rows: Path):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from pipeline import preflight

    folder = tmp_path / "neox"
    GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2)).save_pretrained(folder)
    config = tiny_config(tmp_path, folder, tiny_rows, {"target_modules": "mlp"})
    [problem] = preflight.check_targets(config, [config])
    assert "preset 'mlp' is not defined for model type 'gpt_neox'" in problem
    assert "list module names instead" in problem and "dense_h_to_4h" in problem and "dense_4h_to_h" in problem


@pytest.mark.parametrize("lora, sections, expected", [
    ({"init": "kaiming"}, {}, "lora.init: PEFT knows no init 'kaiming'"),
    ({"init": "loftq"}, {}, "lora.init 'loftq' is one of PEFT's inits that loraforge does not run yet"),
    ({"loraplus_lr_ratio": 0}, {}, "lora.loraplus_lr_ratio must be > 0"),
    ({"use_dora": True}, {"strategy": {"kind": "zero3_offload"}}, "lora.use_dora under strategy zero3_offload"),
    ({"init": "pissa"}, {"strategy": {"kind": "qlora"}}, "lora.init pissa with strategy qlora: it rewrites the base"),
    ({"init": "eva"}, {"strategy": {"kind": "zero3_offload"}}, "lora.init eva under strategy zero3_offload"),
    ({"use_dora": True}, {"sweep": {"pack_size": 2, "parameters": {"lora.r": {"grid": [2, 4]}}}},
     "sweep.pack_size: 2 but lora.use_dora"),
    ({}, {"sweep": {"parameters": {"lora.init": {"grid": ["pissa", "nope"]}}}},
     "sweep.parameters.lora.init: value 'nope': lora.init: PEFT knows no init 'nope'"),
])
def test_bad_variant_settings_are_refused_naming_the_key(tmp_path: Path, tiny_causal_model: Path, tiny_rows: Path,
                                                        lora: dict, sections: dict, expected: str):
    with pytest.raises(ConfigError) as err:
        tiny_config(tmp_path, tiny_causal_model, tiny_rows, lora, **sections)
    assert expected in str(err.value), str(err.value)


def test_variants_are_swept_one_config_per_trial_with_the_reason_logged(tmp_path: Path, tiny_causal_model: Path,
                                                                       tiny_rows: Path, caplog):
    import logging

    from pipeline import sweep
    from pipeline.sweep import planner

    resources = sweep.Resources(2, 0, 2, 0, nodes=1, max_node_memory=16 * planner.GiB)
    plain = tiny_config(tmp_path, tiny_causal_model, tiny_rows, {},
                        sweep={"parameters": {"lora.r": {"grid": [2, 4]}, "lora.use_rslora": {"grid": [False, True]}}})
    assert planner.plan(plain, resources) is not None  # rsLoRA packs: the routed layers scale per adapter
    for axis, values, reason in [("lora.use_dora", [False, True], "lora.use_dora"),
                                 ("lora.init", ["default", "olora"], "lora.init olora rewrites the base weights"),
                                 ("lora.loraplus_lr_ratio", [None, 16.0], "lora.loraplus_lr_ratio")]:
        config = tiny_config(tmp_path, tiny_causal_model, tiny_rows, {},
                             sweep={"parameters": {"lora.r": {"grid": [2, 4]}, axis: {"grid": values}}})
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="loraforge"):
            assert planner.plan(config, resources) is None
        assert "one config per trial, since" in caplog.text and reason in caplog.text


@pytest.mark.slow
def test_variants_sweep_through_ray_register_and_reload_with_plain_peft(tmp_path: Path, tiny_causal_model: Path,
                                                                      ray_local):
    """lora.init swept (olora rewrites the base, eva reads training batches) with LoRA+ on: each config its own
    trial, the init logged as a param and a version tag, the registered adapter scoring as the sweep did."""
    from pipeline import tracking
    from pipeline.evaluate import score_adapter_dir
    from pipeline.run import run_pipeline
    from tests.support.configs import head_jsonl
    from tests.test_causal import causal_config

    section = {"kind": "instruction",
               "train_path": str(head_jsonl("alpaca/train.jsonl", tmp_path / "train.jsonl", 64)),
               "eval_path": str(head_jsonl("alpaca/train.jsonl", tmp_path / "eval.jsonl", 16, start=1000)),
               "max_truncated_fraction": 0.9}
    raw = causal_config(tmp_path, tiny_causal_model, section, "tiny-variants")
    raw["lora"]["loraplus_lr_ratio"] = 4.0
    raw["train"].update({"epochs": 1, "lr": 2e-3})
    raw["sweep"]["parameters"] = {"lora.init": {"grid": ["olora", "eva"]}}
    config = load_config(write_yaml(tmp_path / "c.yaml", raw), env={})
    result = run_pipeline(config)

    assert sorted(t.sampled["lora.init"] for t in result.sweep.trials) == ["eva", "olora"]
    client = tracking.client(config.tracking.tracking_uri)
    for trial in result.sweep.trials:
        params = client.get_run(trial.run_id).data.params
        assert params["lora.init"] == trial.sampled["lora.init"] and params["lora.loraplus_lr_ratio"] == "4.0"
    version = client.get_model_version_by_alias("tiny-variants-lora", "candidate")
    assert version.tags["loraforge.lora.init"] == result.sweep.best.sampled["lora.init"]
    assert version.tags["loraforge.lora.loraplus_lr_ratio"] == "4.0"
    folder = tracking.download_registered(config.tracking.tracking_uri, "tiny-variants-lora", "candidate",
                                          tmp_path / "dl")
    saved = json.loads((folder / "adapter_config.json").read_text())
    assert saved["r"] == (2 * config.lora.r if result.sweep.best.sampled["lora.init"] == "olora" else config.lora.r)
    # plain PEFT on the untouched base scores what the sweep's own evaluation scored
    assert score_adapter_dir(folder, config)["eval_loss"] == pytest.approx(result.eval_metrics["eval_loss"], rel=1e-4)


def test_the_trial_table_names_each_configs_variant(tmp_path: Path, tiny_causal_model: Path, tiny_rows: Path):
    from pipeline.sweep.report import trial_rows
    from pipeline.sweep.results import TrialSummary

    config = tiny_config(tmp_path, tiny_causal_model, tiny_rows, {},
                         sweep={"parameters": {"lora.use_rslora": {"grid": [False, True]},
                                               "lora.init": {"grid": ["default", "pissa"]}}})
    trials = [TrialSummary(f"t{i}", f"t{i}", {"lora.use_rslora": rs, "lora.init": init})
              for i, (rs, init) in enumerate([(False, "default"), (True, "default"), (True, "pissa")])]
    assert [row["variant"] for row in trial_rows(trials, config)] == ["-", "rslora", "rslora+init=pissa"]
    plain = tiny_config(tmp_path, tiny_causal_model, tiny_rows, {"use_dora": True, "loraplus_lr_ratio": 16})
    assert plain.lora.variant_label == "dora+lora+x16"
    assert "variant" not in trial_rows(trials[:1], config)[0]  # plain LoRA throughout: no column


def test_dora_trains_on_a_4bit_base_and_reloads_onto_it(tmp_path: Path, tiny_causal_model: Path, tiny_rows: Path):
    """QDoRA: PEFT's DoRA on bitsandbytes NF4 layers (the magnitude from the dequantized weight), as qlora runs it."""
    from peft import PeftModel

    config = tiny_config(tmp_path, tiny_causal_model, tiny_rows, {"use_dora": True},
                         strategy={"kind": "qlora", "compute_dtype": "float32"})
    torch.manual_seed(0)
    base = strategies.load_quantized_base(config, config.strategy, torch.device("cpu"))
    model = adapters.attach_lora(base, config.lora, config.data)
    assert any(type(m).__name__ == "Linear4bit" and hasattr(m, "lora_magnitude_vector") for m in model.modules())
    chunks = batches(config)
    optimizer = strategies.adapter_optimizer(model, config)
    magnitude = next(p for n, p in model.named_parameters() if "lora_magnitude_vector" in n)
    before = magnitude.detach().clone()
    model.train()
    for step in range(3):
        model(**chunks[step]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert not torch.equal(before, magnitude.detach())  # the magnitude trains
    model.eval()
    expected = logits(model, chunks[0])
    folder = adapters.save_adapter(model, tmp_path / "adapter", {"task": "instruction"})
    fresh = strategies.load_quantized_base(config, config.strategy, torch.device("cpu"))
    reloaded = PeftModel.from_pretrained(fresh, str(folder)).eval()
    torch.testing.assert_close(logits(reloaded, chunks[0]), expected, rtol=1e-4, atol=1e-4)
