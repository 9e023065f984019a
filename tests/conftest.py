"""Shared fixtures: small real data cut from the fetched sets, a tiny causal LM saved to disk, Ray."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.support.configs import (PLANTED_JUDGE_KEY, PLANTED_SECRETS, PLANTED_URL_PASSWORD, REPO, head_jsonl,
                                  minilm_config, write_yaml)

# The data root `make test` fills (`loraforge data fetch`), wherever pytest is started from.
os.environ.setdefault("LORAFORGE_DATA_ROOT", str(REPO / "data"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# faster than the product's 0.5 s (pipeline.cluster.RAY_ENV_DEFAULTS): the tests' short trials wait on the
# controller's polls at every start, end and restart. 0.5 s was tried (0a8a66d): no difference that could be told
# from the machine's drift (tests/test_pbt.py 118 s at 0.5 s, 115 s at 0.1 s, back to back)
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")


# Skips that are allowed, by test node id prefix, each with its reason. Any other skip fails the run
# under CI (CI=true), so a test that quietly stops running is noticed (pytest_sessionfinish below).
SKIP_ALLOWLIST: dict[str, str] = {}


def _strict_skips() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _unexpected_skips(terminalreporter) -> list[str]:
    found = []
    for report in terminalreporter.stats.get("skipped", []):
        if not any(report.nodeid.startswith(prefix) for prefix in SKIP_ALLOWLIST):
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            found.append(f"{report.nodeid}: {reason}")
    return found


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    skips = _unexpected_skips(terminalreporter)
    if skips:
        strict = _strict_skips()
        terminalreporter.section("skips not on the allowlist (tests/conftest.py SKIP_ALLOWLIST)", red=strict)
        for line in skips:
            terminalreporter.line(line)
        if strict:
            terminalreporter.line("CI fails on these: install what the tests need (.ci/run) or allowlist the skip with its reason")


def pytest_sessionfinish(session, exitstatus):
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if _strict_skips() and reporter is not None and exitstatus == 0 and _unexpected_skips(reporter):
        session.exitstatus = 1


@pytest.fixture(scope="session")
def sst2_small(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sst2")
    return {
        "train": head_jsonl("sst2/train.jsonl", root / "train.jsonl", 160),
        "eval": head_jsonl("sst2/dev.jsonl", root / "dev.jsonl", 64),
    }


@pytest.fixture(scope="session")
def tiny_causal_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama with a BPE tokenizer trained on the fetched text, saved with save_pretrained."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from pipeline import datafiles

    root = tmp_path_factory.mktemp("tiny-llama")
    texts = []
    for name, fields in (("e2e/train.jsonl", ("mr", "ref")), ("alpaca/train.jsonl", ("instruction", "input", "output"))):
        with datafiles.require(name).open() as f:
            for i, line in enumerate(f):
                if i >= 2000:
                    break
                row = json.loads(line)
                texts.extend(row[k] for k in fields if row.get(k))
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(
        texts, trainers.BpeTrainer(vocab_size=2000, special_tokens=["<unk>", "<s>", "</s>"],
                                   initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(root)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
    )
    model = LlamaForCausalLM(config)
    # A few hundred full-parameter steps on the text make it a (very) small pretrained
    # base: LoRA on a random init barely moves the loss, unlike on a real checkpoint.
    fast.pad_token = fast.eos_token
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(150):
        picks = torch.randint(len(texts), (16,), generator=generator).tolist()
        batch = fast([texts[i] for i in picks], return_tensors="pt", padding=True, truncation=True, max_length=64)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(root, safe_serialization=True)
    return root


@pytest.fixture(scope="session")
def sst2_sweep(tmp_path_factory: pytest.TempPathFactory, sst2_small):
    """One real 4-trial MiniLM sweep, registered and evaluated, that several test files read.

    Grid r in {2, 4} x targets {q+v, all attention} under ASHA, then the classification suite on the
    registered version; secrets planted in the environment and a judge URL with a password in the
    config; a promotion gate. test_pipeline_e2e checks the sweep, registration and reload,
    test_registry the MLflow Model, lineage, secrets and promotion (each file trained its own before).
    Returns (config, config_path, result, tmp, version): `version` is the version the run registered.
    """
    import ray

    from pipeline import tracking
    from pipeline.config import load_config
    from pipeline.run import run_pipeline
    from tests.support.mlflow_service import env

    tmp = tmp_path_factory.mktemp("sst2-sweep")
    raw = minilm_config(
        tmp, sst2_small,
        sweep={"searcher": "grid", "scheduler": "asha", "asha": {"grace_period": 1, "reduction_factor": 2},
               "parameters": {"lora.r": {"grid": [2, 4]},
                              "lora.target_modules": {"grid": [["query", "value"],
                                                               ["query", "key", "value", "attention.output.dense"]]}}},
        tracking={"system_metrics_interval_s": 1},
        eval={"suites": None},  # the default for classification: the run ends with the classification suite
        # a judge URL with credentials in it: never used by this sweep, but part of the config MLflow records
        # and a key under a name nothing would guess is secret: masked because the config names it
        judge={"base_url": f"http://judge-user:{PLANTED_URL_PASSWORD}@127.0.0.1:9/v1", "model": "gpt-4",
               "api_key_env": "TEAM_JUDGE_KEY"},
        registry={"promotion": {"gate": [{"metric": "classification.accuracy", "min": 0.5, "min_gain": 0.01}]}},
    )
    config_path = write_yaml(tmp / "c.yaml", raw)
    config = load_config(config_path, env={})
    # a Ray instance of its own, started after the secrets are in the environment its workers inherit
    if ray.is_initialized():
        ray.shutdown()
    # the terminal, as `loraforge run` shows it (its log filter on), and Ray's session logs, for the secret scan
    import logging
    import shutil

    from pipeline import redact

    terminal = logging.FileHandler(tmp / "terminal.log")
    terminal.addFilter(redact.LogFilter())
    root, level = logging.getLogger(), logging.getLogger().level
    root.addHandler(terminal)
    root.setLevel(logging.INFO)  # what `loraforge run` prints (pipeline.cli_common.setup_logging)
    with env({**PLANTED_SECRETS, "TEAM_JUDGE_KEY": PLANTED_JUDGE_KEY + "\n"}):  # read with its newline
        try:
            result = run_pipeline(config, reports_dir=tmp / "reports")
        finally:
            root.removeHandler(terminal)
            root.setLevel(level)
            terminal.close()
            if ray.is_initialized():
                session = ray._private.worker._global_node.get_session_dir_path()
                shutil.copytree(Path(session) / "logs", tmp / "ray-logs", ignore_dangling_symlinks=True,
                                dirs_exist_ok=True)
            ray.shutdown()
    version = tracking.client(config.tracking.tracking_uri).get_model_version_by_alias(
        config.tracking.registered_model_name, "candidate")
    return config, config_path, result, tmp, version


@pytest.fixture()
def ray_local():
    """A fresh local Ray instance for one test (the pipeline reuses an initialized one).

    Not shared between tests: `ray stop --force` (the cluster fixture's stop, the driver-kill tests)
    ends every Ray instance on the machine, and a driver whose GCS is gone exits within a minute,
    pytest with it. Its workers preload nothing (on 2 busy cores that costs more than it saves: B2).
    """
    import ray

    from tests.support.ray_cluster import start_local_ray

    start_local_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """PostgreSQL + `mlflow server --app-name basic-auth` (artifacts served), once per pytest run."""
    from tests.support.mlflow_service import MlflowServer, Postgres

    import shutil
    import tempfile

    root = tmp_path_factory.mktemp("mlflow-server")
    # outside pytest's root-only temp folder: the postgres user must reach its data directory
    pg_root = Path(tempfile.mkdtemp(prefix="loraforge-pg-"))
    pg_root.chmod(0o755)
    postgres = Postgres(pg_root / "pg").start()
    server = MlflowServer(postgres, root / "server")
    try:
        yield server.start()
    finally:
        server.kill()
        postgres.stop()
        shutil.rmtree(pg_root, ignore_errors=True)
