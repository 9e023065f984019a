"""The whole experiment: every section, the checks across sections, and one trial's config."""

from __future__ import annotations

import copy
from typing import Any

from pydantic import Field, ValidationError, field_validator, model_validator

from pipeline.config.base import StrictModel, no_traversal
from pipeline.config.data import DataSpec
from pipeline.config.eval import SUITES_FOR_KIND, EvalSpec
from pipeline.config.judge import JudgeSpec
from pipeline.config.lora import LoraSpec
from pipeline.config.model import ModelSpec
from pipeline.config.ray import RaySpec
from pipeline.config.strategy import LoraStrategy, StrategySpec
from pipeline.config.sweep import SweepSpec
from pipeline.config.tracking import RegistrySpec, TrackingSpec
from pipeline.config.train import TrainSpec


class ExperimentConfig(StrictModel):
    name: str = Field(description="Experiment name: the Tune run, MLflow parent run and registry defaults use it.")
    model: ModelSpec
    data: DataSpec
    lora: LoraSpec = Field(default_factory=LoraSpec)
    strategy: StrategySpec = Field(default_factory=LoraStrategy)
    train: TrainSpec = Field(default_factory=TrainSpec)
    sweep: SweepSpec = Field(default_factory=SweepSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    registry: RegistrySpec = Field(default_factory=RegistrySpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    judge: JudgeSpec = Field(default_factory=JudgeSpec)
    ray: RaySpec = Field(default_factory=RaySpec)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not value or any(ch in value for ch in "/\\ :"):
            raise ValueError("name must be non-empty, without spaces, slashes or colons")
        return no_traversal(value, "name")

    @model_validator(mode="after")
    def _suites_fit_kind(self) -> "ExperimentConfig":
        _, allowed = SUITES_FOR_KIND[self.data.kind]
        wrong = [s for s in self.eval.suites or [] if s not in allowed]
        if wrong:
            raise ValueError(f"eval.suites: {', '.join(wrong)} cannot score data.kind {self.data.kind} "
                             f"(it takes {', '.join(allowed)})")
        return self

    @model_validator(mode="after")
    def _strategy_optimizer(self) -> "ExperimentConfig":
        if self.strategy.kind == "zero3_offload" and self.train.optimizer != "adamw":
            raise ValueError(
                f"train.optimizer={self.train.optimizer} cannot run under DeepSpeed ZeRO-3 (its optimizer is "
                "DeepSpeedCPUAdam with offload, or DeepSpeed's own); set train.optimizer: adamw"
            )
        return self

    @model_validator(mode="after")
    def _lora_variants(self) -> "ExperimentConfig":
        """Variants a strategy cannot run, refused before any worker."""
        lora, kind = self.lora, self.strategy.kind
        if kind == "zero3_offload":
            if lora.use_dora:
                raise ValueError("lora.use_dora under strategy zero3_offload: PEFT's DoRA reads each adapted layer's "
                                 "whole base weight in every forward, which ZeRO-3 keeps partitioned; use strategy "
                                 "lora or qlora (PEFT runs DoRA on 4-bit bases)")
            if lora.init == "eva" or lora.rewrites_base:
                raise ValueError(f"lora.init {lora.init} under strategy zero3_offload: it reads the whole base weights "
                                 "(or their inputs) at initialization, which ZeRO-3 keeps partitioned; use strategy "
                                 "lora, or lora.init default, gaussian or orthogonal")
        if kind == "qlora" and lora.rewrites_base:
            raise ValueError(f"lora.init {lora.init} with strategy qlora: it rewrites the base weights, which are 4-bit "
                             "here (PEFT runs PiSSA and OLoRA on full-precision weights); use strategy lora, or "
                             "lora.init default, gaussian, orthogonal or eva")
        return self

    @model_validator(mode="after")
    def _packing(self) -> "ExperimentConfig":
        """An explicit pack_size > 1 where packing cannot run (auto falls back to 1 there)."""
        k = self.sweep.pack_size
        if k in (1, "auto"):
            return self
        if self.strategy.kind == "zero3_offload":
            raise ValueError(f"sweep.pack_size: {k} under strategy zero3_offload, whose sharded base cannot be shared "
                             "by a pack yet; set pack_size: 1, or strategy lora or qlora")
        if self.train.num_workers > 1:
            raise ValueError(f"sweep.pack_size: {k} with train.num_workers={self.train.num_workers}; a pack trains on "
                             "one worker (one device) for now: set num_workers: 1, or pack_size: 1")
        if reason := self.lora.packs_apart:
            raise ValueError(f"sweep.pack_size: {k} but {reason}; such configs train one per trial: set pack_size: auto "
                             "or 1")
        mixed = sorted(path for path in self.sweep.parameters if path.split(".", 1)[0] in PACK_SHARED_SECTIONS)
        if mixed:
            raise ValueError(f"sweep.pack_size: {k} but sweep.parameters varies {', '.join(mixed)}; a pack shares one "
                             "base model, strategy and data: set pack_size: auto (packs split by them) or 1, or sweep "
                             "them in separate experiments")
        return self

    @model_validator(mode="after")
    def _sweep_paths(self) -> "ExperimentConfig":
        """Every swept path must name a real field, and every grid/choice value must validate there."""
        base = self.model_dump(mode="json")
        problems = []
        for path, domain in self.sweep.parameters.items():
            if path.startswith("sweep.") or path == "name":
                problems.append(f"sweep.parameters.{path}: the sweep itself cannot be swept")
                continue
            try:
                get_path(base, path)
            except KeyError:
                problems.append(f"sweep.parameters.{path}: no such config field")
                continue
            candidates = domain.values()
            for value in candidates:
                trial = copy.deepcopy(base)
                set_path(trial, path, value)
                try:
                    ExperimentConfig.model_validate(without_sweep(trial))
                except ValidationError as err:
                    for e in err.errors():
                        problems.append(f"sweep.parameters.{path}: value {value!r}: {clean_msg(e['msg'])}")
        if self.sweep.trial_count() > self.sweep.max_trials:
            problems.append(
                f"sweep: {self.sweep.trial_count()} trials exceed sweep.max_trials={self.sweep.max_trials}; "
                "shrink the grid or num_samples, or raise max_trials"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def trial_config(self, overrides: dict[str, Any]) -> "ExperimentConfig":
        """The config of one trial: this one with the sampled `overrides` applied and the sweep removed."""
        data = self.model_dump(mode="json")
        for path, value in overrides.items():
            set_path(data, path, value)
        return ExperimentConfig.model_validate(without_sweep(data))


# A pack's configs may differ in these (each adapter has its own LoRA layers, optimizer and LR schedule);
# anything else varied splits the sweep into packs (pipeline.pack.plan).
PACKABLE_PATHS = ("lora.", "train.lr", "train.weight_decay", "train.optimizer", "train.max_grad_norm",
                  "train.warmup_ratio", "train.lr_scheduler")
# what an explicit pack_size > 1 must not vary: one pack holds one base
PACK_SHARED_SECTIONS = ("model", "strategy", "data")


def without_sweep(data: dict[str, Any]) -> dict[str, Any]:
    data = dict(data)
    data["sweep"] = {"parameters": {}, "searcher": "random"}
    return data


def get_path(data: dict[str, Any], path: str) -> Any:
    node: Any = data
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(path)
        node = node[part]
    return node


def set_path(data: dict[str, Any], path: str, value: Any) -> None:
    parts = path.split(".")
    node = data
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def clean_msg(message: str) -> str:
    return message.removeprefix("Value error, ")
