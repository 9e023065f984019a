"""`train:`: the optimizer, schedule, batch and the workers of one trial."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from pipeline.config.base import StrictModel, finite_positive


class TrainSpec(StrictModel):
    lr: float = Field(3e-3, description="Peak learning rate of AdamW.")
    epochs: int = Field(1, gt=0, description="Passes over the (subsampled) training set.")
    batch_size: int = Field(32, gt=0, description="Examples per step per worker.")
    grad_accum: int = Field(1, gt=0, description="Micro-batches accumulated per optimizer step.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay on the trained weights (not on biases and norms).")
    warmup_ratio: float = Field(0.06, ge=0, lt=1, description="Fraction of steps with linear warmup.")
    lr_scheduler: Literal["linear", "cosine", "constant"] = Field(
        "linear", description="Learning-rate schedule after warm-up (transformers' get_scheduler).")
    optimizer: Literal["adamw", "paged_adamw_32bit", "paged_adamw_8bit"] = Field(
        "adamw", description="paged_*: bitsandbytes paged AdamW (QLoRA); ZeRO-3 offload always uses DeepSpeedCPUAdam."
    )
    max_grad_norm: float | None = Field(1.0, description="Clip gradients to this norm; null disables.")
    eval_every_steps: int = Field(100, gt=0, description="Evaluate (and checkpoint) every N optimizer steps.")
    log_every_steps: int = Field(10, gt=0, description="Log loss / lr to MLflow every N optimizer steps.")
    length_bucketing: bool = Field(
        True, description="Batch examples of similar length together (~2x faster on CPU than random padding)."
    )
    seed: int = Field(0, description="Seeds torch, data subsets and shuffling; a sweep over it repeats a config.")
    num_workers: int = Field(1, gt=0, description="Ray Train workers per trial.")
    cpus_per_worker: int = Field(1, gt=0, description="CPUs each Train worker holds (and torch's thread count).")
    gpus_per_worker: float = Field(0, ge=0, description="GPUs each Train worker holds; 0 trains on CPU.")
    max_failures: int = Field(
        0, ge=0, description="Worker-group restarts per trial; each resumes from the trial's last valid checkpoint."
    )

    @field_validator("lr")
    @classmethod
    def _lr(cls, value: float) -> float:
        return finite_positive(value, "train.lr")
