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
TARGET_PRESET_NAMES = ("attention_qv", "attention_all", "attention_mlp", "mlp", "all_linear")

# PEFT 0.21's `init_lora_weights` names (LoraConfig), and which of them loraforge runs:
# - default (A Kaiming-uniform, B zero), gaussian, orthogonal: B·A starts at zero or small, the base is untouched;
# - pissa, pissa_niter_<n>, olora: A and B start from the base weight's factors and the base keeps the rest
#   (its weights are rewritten), so such a config never shares a base in a pack; the saved adapter is
#   converted to one that applies to the original base (PEFT's path_initial_model_for_weight_conversion);
# - eva: A from the SVD of the layer inputs on training batches (PEFT's initialize_lora_eva_weights).
PEFT_INITS = ("gaussian", "eva", "olora", "pissa", "pissa_niter_<n>", "corda", "loftq", "orthogonal", "mica")
RUN_INITS = ("default", "gaussian", "orthogonal", "pissa", "pissa_niter_<n>", "olora", "eva")
BASE_REWRITING_INITS = ("pissa", "olora")  # and pissa_niter_<n>


class LoraSpec(StrictModel):
    r: int = Field(8, description="LoRA rank: the inner dimension of B·A.")
    alpha: float | AlphaRule = Field(
        16.0, description="Scale numerator, (alpha / r)·B·A: a number (fixed across ranks) or {times_r: k}."
    )
    dropout: float = Field(0.1, description="Dropout on the LoRA input, 0 <= p < 1.")
    target_modules: list[str] | str = Field(
        default_factory=lambda: ["query", "value"],
        description="Module names (suffixes) that get adapters, each must exist in the model; or a preset: "
        "attention_qv, attention_all, attention_mlp, mlp (the feed-forward layers only), all_linear.",
    )
    modules_to_save: list[str] | None = Field(
        None,
        description="Extra modules trained in full and saved with the adapter; default: the task head "
        "(classifier + pooler for classification).",
    )
    use_rslora: bool = Field(False, description="Scale by alpha/sqrt(r) (rsLoRA) instead of alpha/r.")
    use_dora: bool = Field(False, description=(
        "DoRA: each adapted weight split into a trained magnitude vector and a direction that LoRA updates "
        "(PEFT's use_dora; linear layers, 4-bit bases included; not under ZeRO-3)."))
    init: str = Field("default", description=(
        "How A and B start (PEFT's init_lora_weights): default (B zero), gaussian, orthogonal, eva (A from the SVD "
        "of training-batch activations), pissa, pissa_niter_<n>, olora (A and B from the base weight's factors; the "
        "base is rewritten, so such configs train in packs of one and their adapter is saved converted to apply to "
        "the original base)."))
    loraplus_lr_ratio: float | None = Field(None, description=(
        "LoRA+: B's learning rate is this many times train.lr, A's is train.lr (PEFT's create_loraplus_optimizer; "
        "its paper suggests 16). None: one learning rate."))

    @field_validator("init")
    @classmethod
    def _known_init(cls, value: str) -> str:
        import re

        if value in RUN_INITS or re.fullmatch(r"pissa_niter_\d+", value):
            return value
        if value in PEFT_INITS:
            raise ValueError(f"lora.init {value!r} is one of PEFT's inits that loraforge does not run yet; use one of "
                             f"{', '.join(RUN_INITS)}")
        raise ValueError(f"lora.init: PEFT knows no init {value!r}; use one of {', '.join(RUN_INITS)}")

    @field_validator("loraplus_lr_ratio")
    @classmethod
    def _positive_ratio(cls, value: float | None) -> float | None:
        if value is not None and (not math.isfinite(value) or value <= 0):
            raise ValueError(f"lora.loraplus_lr_ratio must be > 0 (B's learning rate over A's), got {value}")
        return value

    @property
    def rewrites_base(self) -> bool:
        """pissa and olora start A and B from the base weight's factors and leave the base the residual."""
        return self.init in BASE_REWRITING_INITS or self.init.startswith("pissa_niter_")

    @property
    def variant_label(self) -> str:
        """What this config adds to plain LoRA, for tables: e.g. `rslora+dora+init=pissa+lora+x16`; `-` for none."""
        parts = ["rslora"] * self.use_rslora + ["dora"] * self.use_dora
        if self.init != "default":
            parts.append(f"init={self.init}")
        if self.loraplus_lr_ratio is not None:
            parts.append(f"lora+x{self.loraplus_lr_ratio:g}")
        return "+".join(parts) or "-"

    @property
    def packs_apart(self) -> str | None:
        """Why this config trains in a pack of its own (None: it can share a base with others)."""
        if self.rewrites_base:
            return f"lora.init {self.init} rewrites the base weights"
        if self.init == "eva":
            return "lora.init eva initializes from its own forward passes over training batches"
        if self.use_dora:
            return "lora.use_dora: the packed layers route plain LoRA updates only"
        if self.loraplus_lr_ratio is not None:
            return "lora.loraplus_lr_ratio: the packed optimizers have one learning rate per config"
        return None

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
