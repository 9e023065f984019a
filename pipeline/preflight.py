"""Checks that need files or the model skeleton, run in the driver before any Ray worker starts.

Schema checks live in `pipeline.config`; here: the model folder, every target
module of every trial config against the real module tree (on the meta device,
no weights read), dataset files/columns/labels, and sequence lengths. Every
problem is collected, then one `ConfigError` lists them all.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline import adapters, data
from pipeline.config import ConfigError, ExperimentConfig


@dataclass
class DataSummary:
    train_rows: int
    eval_rows: int
    truncated_fraction: float


def check_model(config: ExperimentConfig) -> list[str]:
    try:
        path = Path(config.model.path)
    except ValueError as err:
        return [f"model.name_or_path: {err}"]
    if not (path / "config.json").is_file():
        return [f"model.name_or_path: {str(path)!r} is not a model folder (no config.json); "
                "give a local Hugging Face model folder or pkg:<package>/<subdir>"]
    if not config.model.trust_remote_code:
        import json

        auto_map = json.loads((path / "config.json").read_text()).get("auto_map")
        if auto_map:
            return [f"model.name_or_path: {path} needs its own code (auto_map); set model.trust_remote_code: true "
                    "only if you trust it"]
    if not any(path.glob("*.safetensors")):
        return [f"model.name_or_path: {path} has no .safetensors weights; loraforge never unpickles .bin files"]
    return []


def check_targets(config: ExperimentConfig, trial_configs: list[ExperimentConfig]) -> list[str]:
    """Each target-module name of each trial config must exist in the model (close matches suggested)."""
    skeleton = adapters.model_skeleton(config.model, config.data)
    problems: list[str] = []
    seen: set[tuple[str, ...]] = set()
    swept = "lora.target_modules" in config.sweep.parameters
    for cfg in trial_configs:
        key = tuple(cfg.lora.target_modules)
        if key in seen:
            continue
        seen.add(key)
        where = "sweep.parameters.lora.target_modules" if swept else "lora.target_modules"
        problems += check_target_list(skeleton, list(key), where)
        if cfg.lora.modules_to_save:
            problems += [p for p in adapters.check_target_modules(skeleton, cfg.lora.modules_to_save, "lora.modules_to_save")
                         if "matches no module" in p]
    return list(dict.fromkeys(problems))


def check_target_list(skeleton: object, targets: list[str], where: str) -> list[str]:
    return adapters.check_target_modules(skeleton, targets, where)


def check_data(config: ExperimentConfig) -> tuple[list[str], DataSummary | None]:
    spec = config.data
    problems = []
    splits = {}
    for split in ("train", "eval"):
        try:
            splits[split] = data.load_split(spec, split, config.train.seed)
        except ConfigError as err:
            problems += err.problems
    if problems:
        return problems, None
    tokenizer = adapters.load_tokenizer(config.model, spec)
    max_positions = _max_positions(config)
    if max_positions is not None and spec.max_seq_len > max_positions:
        problems.append(
            f"data.max_seq_len={spec.max_seq_len} exceeds the model's max_position_embeddings={max_positions}; "
            f"set it to at most {max_positions}"
        )
    examples = data.tokenize_rows(spec, splits["train"], tokenizer)
    fraction = data.truncated_fraction(examples, spec.max_seq_len)
    if fraction > spec.max_truncated_fraction:
        longest = max(e.untruncated_length for e in examples)
        problems.append(
            f"data.max_seq_len={spec.max_seq_len} truncates {fraction:.1%} of training rows (longest {longest} tokens), "
            f"above data.max_truncated_fraction={spec.max_truncated_fraction:g}; raise max_seq_len or the threshold"
        )
    if not data.with_targets(examples):
        problems.append("data: after tokenization no training row has a target token; raise data.max_seq_len")
    return problems, DataSummary(len(splits["train"]), len(splits["eval"]), fraction)


def _max_positions(config: ExperimentConfig) -> int | None:
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(config.model.path, trust_remote_code=config.model.trust_remote_code)
    return getattr(hf_config, "max_position_embeddings", None)


def check(config: ExperimentConfig, trial_configs: list[ExperimentConfig]) -> DataSummary:
    """All file/model/data checks; returns row counts, or raises one ConfigError with every problem."""
    problems = check_model(config)
    summary = None
    if not problems:
        problems += check_targets(config, trial_configs)
        data_problems, summary = check_data(config)
        problems += data_problems
    else:
        problems += check_data_files_only(config)
    if problems:
        raise ConfigError(problems)
    assert summary is not None
    return summary


def check_data_files_only(config: ExperimentConfig) -> list[str]:
    return [
        f"data.{split}_path: file {str(path)!r} not found"
        for split, path in (("train", config.data.train_path), ("eval", config.data.eval_path))
        if not path.is_file()
    ]
