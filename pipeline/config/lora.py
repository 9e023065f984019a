"""`lora:`: rank, alpha, dropout and the modules that get adapters."""

from __future__ import annotations

import math
from typing import Any

from pydantic import Field, field_validator

from pipeline.config.base import StrictModel


class AlphaRule(StrictModel):
    """alpha as a rule of r: `{times_r: k}` gives alpha = k·r (the update scale alpha/r stays k)."""

    times_r: float = Field(gt=0, description="alpha = times_r · r.")


# Target-module preset names; pipeline.adapters.TARGET_PRESETS resolves each per architecture (`model_type`).
TARGET_PRESET_NAMES = ("attention_qv", "attention_all", "attention_mlp", "all_linear")


class LoraSpec(StrictModel):
    r: int = Field(8, description="LoRA rank: the inner dimension of B·A.")
    alpha: float | AlphaRule = Field(
        16.0, description="Scale numerator, (alpha / r)·B·A: a number (fixed across ranks) or {times_r: k}."
    )
    dropout: float = Field(0.1, description="Dropout on the LoRA input, 0 <= p < 1.")
    target_modules: list[str] | str = Field(
        default_factory=lambda: ["query", "value"],
        description="Module names (suffixes) that get adapters, each must exist in the model; or a preset: "
        "attention_qv, attention_all, attention_mlp, all_linear.",
    )
    modules_to_save: list[str] | None = Field(
        None,
        description="Extra modules trained in full and saved with the adapter; default: the task head "
        "(classifier + pooler for classification).",
    )
    use_rslora: bool = Field(False, description="Scale by alpha/sqrt(r) (rsLoRA) instead of alpha/r.")

    @field_validator("r", mode="before")
    @classmethod
    def _int_rank(cls, value: Any) -> Any:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"lora.r must be a positive int, got {value!r}")
        return value

    @field_validator("r")
    @classmethod
    def _positive_rank(cls, value: int) -> int:
        if value <= 0:
            raise ValueError(f"lora.r must be a positive int, got {value}")
        return value

    @field_validator("alpha")
    @classmethod
    def _positive_alpha(cls, value: float | AlphaRule) -> float | AlphaRule:
        if isinstance(value, float) and (not math.isfinite(value) or value <= 0):
            raise ValueError(f"lora.alpha must be > 0, got {value}")
        return value

    @property
    def effective_alpha(self) -> float:
        return self.alpha.times_r * self.r if isinstance(self.alpha, AlphaRule) else self.alpha

    @property
    def targets_label(self) -> str:
        return self.target_modules if isinstance(self.target_modules, str) else "+".join(self.target_modules)

    @field_validator("dropout")
    @classmethod
    def _dropout_range(cls, value: float) -> float:
        if not (0.0 <= value < 1.0):
            raise ValueError(f"lora.dropout must satisfy 0 <= p < 1, got {value}")
        return value

    @field_validator("target_modules")
    @classmethod
    def _nonempty_targets(cls, value: list[str] | str) -> list[str] | str:
        if isinstance(value, str):
            if value not in TARGET_PRESET_NAMES:
                raise ValueError(f"lora.target_modules: unknown preset {value!r}; use one of "
                                 f"{', '.join(TARGET_PRESET_NAMES)} or a list of module names")
            return value
        if not value or any(not name.strip() for name in value):
            raise ValueError("lora.target_modules must be a non-empty list of module names")
        return value
