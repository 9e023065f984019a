"""The evaluation stage: load a registered adapter back from the Model Registry and score it.

Nothing is taken from memory: the adapter is downloaded from `models:/<name>@<alias>`
and loaded the way a user would, `PeftModel.from_pretrained(base, folder)` (a 4-bit
base for QLoRA adapters, the base they were trained against), then
scored on the whole eval split with the same metric code the trials use.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from pipeline import adapters, data, strategies, tracking
from pipeline.config import ExperimentConfig
from pipeline.trial_worker import evaluate


def score_adapter_dir(adapter_dir: Path, config: ExperimentConfig, num_threads: int | None = None) -> dict[str, float]:
    """Metrics of base + adapter folder on the eval split (single process, no Ray)."""
    if num_threads:
        torch.set_num_threads(num_threads)
    tokenizer = adapters.load_tokenizer(config.model, config.data)
    model = strategies.load_trained(config, adapter_dir)
    examples = data.tokenize_rows(config.data, data.load_split(config.data, "eval", config.train.seed), tokenizer)
    return evaluate(model, examples, config, tokenizer.pad_token_id, torch.device("cpu"), rank=0, world_size=1)


def evaluate_registered(config: ExperimentConfig, model_name: str, alias: str) -> dict[str, Any]:
    """Download `models:/<model_name>@<alias>` and score it; returns metrics plus the model version."""
    mlflow_client = tracking.client(config.tracking.tracking_uri)
    version = mlflow_client.get_model_version_by_alias(model_name, alias)
    with tempfile.TemporaryDirectory(prefix="loraforge-eval-") as tmp:
        # the version the alias resolved to above: the alias may move while this runs
        adapter_dir = tracking.download_version(config.tracking.tracking_uri, model_name, version.version, Path(tmp))
        metrics = score_adapter_dir(adapter_dir, config, num_threads=config.train.cpus_per_worker)
    return {"metrics": metrics, "version": version.version, "run_id": version.run_id}


def evaluate_registered_remote(config: ExperimentConfig, model_name: str, alias: str) -> dict[str, Any]:
    """The same, as a Ray task with one worker's resources (on a cluster the driver may have no GPU)."""
    import ray

    train = config.train
    task = ray.remote(num_cpus=train.cpus_per_worker, num_gpus=train.gpus_per_worker)(_evaluate_task)
    return ray.get(task.remote(config.model_dump(mode="json"), model_name, alias))


def _evaluate_task(config_dict: dict[str, Any], model_name: str, alias: str) -> dict[str, Any]:
    return evaluate_registered(ExperimentConfig.model_validate(config_dict), model_name, alias)
