"""Typed experiment config: YAML + `key.sub=value` overrides -> validated pydantic models.

Everything a run needs is in `ExperimentConfig` (`experiment.py`). It is validated here, in the
driver, before Ray starts anything; Ray actors receive `model_dump()` and call
`ExperimentConfig.model_validate` first thing. Checks that need files or the model skeleton
(dataset columns, target modules) live in `pipeline.preflight`.

One module per YAML section (`model`, `data`, `lora`, `strategy`, `train`, `sweep`, `tracking` with
`registry`, `eval`, `judge`, `ray`), `base.py` for what they share, `experiment.py` for the checks
across sections, `load.py` for the YAML loader and the override algebra. Everything is importable
from `pipeline.config` as before the split (registered versions' `python_model.py` imports
`pipeline.config.ExperimentConfig` and `ClassificationData`).
"""

from pipeline.config.base import SAFE_NAME, ConfigError, StrictModel, is_uri
from pipeline.config.data import (ALPACA_PROMPT, CHAT_FORMATS, DATA_TO_TEXT_PROMPT, ChatData, ClassificationData,
                                  DataSpec, DataToTextData, InstructionData)
from pipeline.config.eval import (JUDGE_SUITES, SUITES, SUITES_FOR_KIND, E2eNlgSuiteSpec, EvalSpec, GenerationSpec,
                                  LmEvalSuiteSpec, MtBenchSuiteSpec, SuiteName)
from pipeline.config.experiment import PACK_SHARED_SECTIONS, PACKABLE_PATHS, ExperimentConfig
from pipeline.config.judge import LOCAL_JUDGE_MODEL, MT_BENCH_TEMPERATURES, JudgeSpec, ReferenceAnswers
from pipeline.config.load import MAX_CONFIG_BYTES, MAX_YAML_NODES, load_config, parse_overrides
from pipeline.config.lora import TARGET_PRESET_NAMES, AlphaRule, LoraSpec
from pipeline.config.model import PKG_PREFIX, ModelSpec, package_path, resolve_model_path
from pipeline.config.ray import RaySpec
from pipeline.config.strategy import (STRATEGY_KINDS, LoraStrategy, QloraStrategy, QuantSpec, StrategySpec, TorchDtypeName,
                                      Zero3OffloadStrategy)
from pipeline.config.sweep import DOMAIN_KINDS, AshaSpec, ParamDomain, PbtSpec, SweepSpec
from pipeline.config.tracking import GateCondition, PromotionSpec, RegistrySpec, TrackingSpec
from pipeline.config.train import TrainSpec

__all__ = [
    "ALPACA_PROMPT", "CHAT_FORMATS", "DATA_TO_TEXT_PROMPT", "DOMAIN_KINDS", "JUDGE_SUITES", "LOCAL_JUDGE_MODEL", "MAX_CONFIG_BYTES",
    "MAX_YAML_NODES", "MT_BENCH_TEMPERATURES", "PACKABLE_PATHS", "PACK_SHARED_SECTIONS", "PKG_PREFIX", "SAFE_NAME",
    "STRATEGY_KINDS", "SUITES", "SUITES_FOR_KIND", "TARGET_PRESET_NAMES", "AlphaRule", "AshaSpec", "ChatData", "ClassificationData",
    "ConfigError", "DataSpec", "DataToTextData", "E2eNlgSuiteSpec", "EvalSpec", "ExperimentConfig", "GateCondition",
    "GenerationSpec", "InstructionData", "JudgeSpec", "LmEvalSuiteSpec", "LoraSpec", "LoraStrategy", "ModelSpec",
    "MtBenchSuiteSpec", "ParamDomain", "PbtSpec", "PromotionSpec", "QloraStrategy", "QuantSpec", "RaySpec",
    "ReferenceAnswers", "RegistrySpec", "StrategySpec", "StrictModel", "SuiteName", "SweepSpec", "TorchDtypeName",
    "TrackingSpec", "TrainSpec", "Zero3OffloadStrategy", "is_uri", "load_config", "package_path", "parse_overrides",
    "resolve_model_path",
]
