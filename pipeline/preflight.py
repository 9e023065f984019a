"""Checks that need files or the model skeleton, run in the driver before any Ray worker starts.

Schema checks live in `pipeline.config`; here: the model folder, every target
module of every trial config against the real module tree (on the meta device,
no weights read), dataset files/columns/labels, and sequence lengths. Every
problem is collected, then one `ConfigError` lists them all.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline import adapters, data, datafiles, strategies
from pipeline.config import JUDGE_SUITES, ConfigError, ExperimentConfig, is_uri
from pipeline.eval import catalog
from pipeline.eval.judge import stage as judge_stage
from pipeline.storage import Storage

log = logging.getLogger("loraforge")


@dataclass
class DataSummary:
    train_rows: int
    eval_rows: int
    truncated_fraction: float


def check_model(config: ExperimentConfig) -> list[str]:
    try:
        path = Path(config.model.resolve())
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
    model_type = getattr(skeleton.config, "model_type", "")
    for cfg in trial_configs:
        targets = cfg.lora.target_modules
        key = targets if isinstance(targets, str) else tuple(targets)
        if key in seen:
            continue
        seen.add(key)
        where = "sweep.parameters.lora.target_modules" if swept else "lora.target_modules"
        try:
            resolved = adapters.resolve_targets(targets, model_type)
        except ValueError as err:
            problems.append(f"{err} (its linear layers: {', '.join(adapters.linear_leaves(skeleton))})")
            continue
        if isinstance(targets, str):
            log.info("lora.target_modules preset %s -> %s for model type %s", targets, resolved, model_type)
        problems += check_target_list(skeleton, resolved, where)
        if cfg.lora.modules_to_save:
            problems += [p for p in adapters.check_target_modules(skeleton, cfg.lora.modules_to_save, "lora.modules_to_save")
                         if "matches no module" in p]
    return list(dict.fromkeys(problems))


def check_target_list(skeleton: object, targets: list[str] | str, where: str) -> list[str]:
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
    try:
        examples = data.tokenize_rows(spec, splits["train"], tokenizer)
        data.tokenize_rows(spec, splits["eval"], tokenizer)
    except ConfigError as err:
        return problems + err.problems, None
    fraction = data.truncated_fraction(examples, spec.max_seq_len)
    if fraction > spec.max_truncated_fraction:
        longest = max(e.untruncated_length for e in examples)
        cut = [i for i, e in enumerate(examples) if e.untruncated_length > spec.max_seq_len]
        rows = f" (rows {', '.join(map(str, cut[:5]))}{', ...' if len(cut) > 5 else ''})" if spec.kind == "chat" else ""
        problems.append(
            f"data.max_seq_len={spec.max_seq_len} truncates {fraction:.1%} of training rows{rows} (longest {longest} "
            f"tokens), above data.max_truncated_fraction={spec.max_truncated_fraction:g}; raise max_seq_len or the "
            "threshold"
        )
    elif spec.kind == "chat" and fraction:
        log.info("data.max_seq_len=%d cuts %.1f%% of conversations after their last whole assistant turn that fits",
                 spec.max_seq_len, 100 * fraction)
    if not data.with_targets(examples):
        problems.append("data: after tokenization no training row has a target token; raise data.max_seq_len")
    return problems, DataSummary(len(splits["train"]), len(splits["eval"]), fraction)


def _max_positions(config: ExperimentConfig) -> int | None:
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(config.model.resolve(), trust_remote_code=config.model.trust_remote_code)
    return getattr(hf_config, "max_position_embeddings", None)


# The PEFT docs' minima for 4-bit bases under DeepSpeed ZeRO-3 (older versions fail or use more memory).
ZERO3_4BIT_MINIMA = {"bitsandbytes": "0.43.3", "accelerate": "1.0.1", "transformers": "4.44.3", "peft": "0.13.1"}
INSTALL_HINT = "pip install 'loraforge[memory]'"


def _version_problem(package: str, minimum: str, why: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version

    try:
        found = version(package)
    except PackageNotFoundError:
        return f"{why} needs {package}>={minimum}, which is not installed ({INSTALL_HINT})"
    if Version(found) < Version(minimum):
        return f"{why} needs {package}>={minimum}, found {found} (pip install -U '{package}>={minimum}')"
    return None


def _four_bit_problem(device_type: str) -> str | None:
    """Quantize a small tensor the way loading a 4-bit base will; the error if this bitsandbytes cannot."""
    try:
        import bitsandbytes.functional as bnbf

        packed, state = bnbf.quantize_4bit(torch.randn(64, 64, device=device_type), quant_type="nf4")
        bnbf.dequantize_4bit(packed, state)
    except Exception as err:  # any failure here means 4-bit cannot run; say which and why
        return f"the installed bitsandbytes cannot do 4-bit NF4 on {device_type}: {type(err).__name__}: {err}"
    return None


def check_strategies(trial_configs: list[ExperimentConfig]) -> tuple[list[str], list[str]]:
    """(problems, warnings) for the memory strategies the sweep will run: libraries present and able."""
    problems: list[str] = []
    warnings: list[str] = []
    kinds = {cfg.strategy.kind for cfg in trial_configs}
    quantized = [cfg for cfg in trial_configs if strategies.quant_spec(cfg) is not None]
    if quantized:
        problem = _version_problem("bitsandbytes", "0.43.3", "strategy 4-bit base")
        if problem is None:
            on_cpu = any(cfg.train.gpus_per_worker == 0 for cfg in quantized)
            problem = _four_bit_problem("cpu" if on_cpu or not torch.cuda.is_available() else "cuda")
            if on_cpu and problem is None:
                warnings.append("4-bit base on CPU (train.gpus_per_worker=0): bitsandbytes runs NF4 and paged AdamW "
                                "on the CPU, correct but slow; give workers GPUs for real runs")
        problems += [problem] if problem else []
    if "zero3_offload" in kinds:
        problem = _version_problem("deepspeed", "0.15.0", "strategy.kind=zero3_offload")
        if problem is None and any(cfg.strategy.offload_optimizer for cfg in trial_configs if cfg.strategy.kind == "zero3_offload"):
            from deepspeed.ops.op_builder import CPUAdamBuilder

            if not CPUAdamBuilder().is_compatible(verbose=False):
                problem = ("strategy.offload_optimizer=true needs DeepSpeedCPUAdam, which cannot be built here "
                           "(needs ninja and a C++ compiler: pip install ninja; apt install g++)")
        problems += [problem] if problem else []
        for cfg in trial_configs:
            spec = cfg.strategy
            if spec.kind != "zero3_offload":
                continue
            if spec.load_in_4bit is not None:
                problems += [p for p in (_version_problem(pkg, low, "strategy.load_in_4bit under ZeRO-3")
                                         for pkg, low in ZERO3_4BIT_MINIMA.items()) if p]
            if spec.precision == "fp16":
                warnings.append("strategy.precision=fp16 under ZeRO-3: overflowing steps are skipped "
                                "(logged as skipped_steps); prefer bf16 where the GPU has it")
    return list(dict.fromkeys(problems)), list(dict.fromkeys(warnings))


# the object stores and cluster filesystems pyarrow.fs.FileSystem.from_uri opens
STORAGE_SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "hdfs", "viewfs", "file")


def check_storage(config: ExperimentConfig, reach: bool = True) -> list[str]:
    """A storage URI: a filesystem pyarrow knows, a scheduler that works on it, and (with `reach`) its
    bucket reachable with this machine's credentials. A local folder needs nothing here."""
    storage = config.ray.storage_path
    if not is_uri(storage):
        return []
    problems = []
    if config.sweep.scheduler == "pbt":
        problems.append(f"sweep.scheduler: pbt copies checkpoints between trials on a filesystem, but ray.storage_path="
                        f"{storage} is an object store; use asha, median or fifo there, or give ray.storage_path a folder "
                        "every node mounts (NFS, a ReadWriteMany PVC: cluster/kuberay/storage.yaml)")
    scheme = storage.split("://", 1)[0].lower()
    if scheme not in STORAGE_SCHEMES:
        return problems + [f"ray.storage_path={storage}: pyarrow cannot open {scheme}:// storage; give a folder, "
                           "s3://bucket/prefix (options as a query, e.g. ?endpoint_override=host:port&scheme=http) "
                           "or gs://bucket/prefix"]
    if not reach:
        return problems
    # opening an s3:// URI already asks the bucket for its region: a network call, hence only here
    try:
        store = Storage.of(storage)
        bucket = store.root.split("/", 1)[0]
        found = store.exists(bucket)
    except (OSError, ValueError) as err:
        return problems + [f"ray.storage_path={storage}: cannot reach its bucket ({str(err).strip()}); check the "
                           "endpoint and the credentials in the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
                           "an instance role)"]
    if not found:
        problems.append(f"ray.storage_path={storage}: the bucket {bucket!r} does not exist; create it first")
    return problems


def check(config: ExperimentConfig, trial_configs: list[ExperimentConfig]) -> DataSummary:
    """All file/model/data checks; returns row counts, or raises one ConfigError with every problem."""
    problems = check_storage(config) + check_model(config)
    strategy_problems, strategy_warnings = check_strategies(trial_configs)
    problems += strategy_problems
    for warning in strategy_warnings:
        log.warning(warning)
    summary = None
    file_problems = check_data_files(config)
    if not problems:
        problems += check_targets(config, trial_configs)
        if not file_problems:
            data_problems, summary = check_data(config)
            problems += data_problems
    problems += file_problems
    if not problems:
        problems += check_suites(config)
    if problems:
        raise ConfigError(problems)
    assert summary is not None
    return summary


def check_suites(config: ExperimentConfig) -> list[str]:
    """What the benchmark suites after the sweep need (Java, harness tasks, the judge), checked before training."""
    if not config.eval.enabled:
        return []
    try:
        names = catalog.suite_names(config)
    except ConfigError as err:
        return err.problems
    problems = [problem for name in names if name not in JUDGE_SUITES for problem in catalog.get(name).check(config)]
    problems += judge_stage.check(config, names)
    if not problems and judge_stage.modes(names) and config.judge.base_url is not None:
        try:  # a remote judge is probed before training (the local one starts at the evaluation stage)
            with judge_stage.session(config):
                pass
        except ConfigError as err:
            problems += err.problems
    return problems


def check_data_files(config: ExperimentConfig) -> list[str]:
    """Each data file exists; one the data manifest knows also matches its sha256 (the fix names the fetch)."""
    manifest = datafiles.load_manifest()
    return [
        f"data.{split}_path: {problem}"
        for split, path in (("train", config.data.train_path), ("eval", config.data.eval_path))
        if (problem := datafiles.check_file(path, manifest=manifest))
    ]


def input_paths(config: ExperimentConfig) -> dict[str, Path]:
    """The files the job reads, by config key (only those of the stages that will run)."""
    paths = {"data.train_path": config.data.train_path, "data.eval_path": config.data.eval_path}
    suites = catalog.suite_names(config)
    if "mt_bench" in suites:
        paths["eval.mt_bench.questions_path"] = config.eval.mt_bench.questions_path
    if any(s.startswith("judge") for s in suites):
        judge = config.judge
        paths["judge.questions_path"] = judge.questions_path
        paths["judge.prompts_path"] = judge.prompts_path
        if judge.reference_path is not None:
            paths["judge.reference_path"] = judge.reference_path
        for i, ref in enumerate(judge.side_by_side):
            paths[f"judge.side_by_side.{i}.path"] = ref.path
    return paths
