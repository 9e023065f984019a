"""`strategy:`: the memory strategy for the frozen base (plain LoRA, QLoRA, ZeRO-3 + offload)."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field, field_validator, model_validator

from pipeline.config.base import StrictModel


class LoraStrategy(StrictModel):
    """Plain LoRA: the frozen base in full precision on every worker (DDP across workers)."""

    kind: Literal["lora"] = "lora"


TorchDtypeName = Literal["bfloat16", "float16", "float32"]


class QuantSpec(StrictModel):
    """bitsandbytes 4-bit base (QLoRA): NF4 + double quantization by default."""

    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type of the frozen base.")
    double_quant: bool = Field(True, description="Quantize the quantization constants too (QLoRA's DQ).")
    compute_dtype: TorchDtypeName = Field(
        "bfloat16", description="dtype the 4-bit weights are dequantized to for each matmul."
    )
    quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] = Field(
        "uint8", description="dtype the packed 4-bit weights are stored in; must equal the ZeRO-3 dtype under ZeRO-3."
    )


class QloraStrategy(QuantSpec):
    """QLoRA: the frozen base quantized to 4 bits on every worker, LoRA in full precision on top (DDP)."""

    kind: Literal["qlora"]
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward (prepare_model_for_kbit_training); saves memory, costs time."
    )


class Zero3OffloadStrategy(StrictModel):
    """DeepSpeed ZeRO-3: the frozen base sharded across the trial's workers, parameters and optimizer offloaded to CPU."""

    kind: Literal["zero3_offload"]
    offload_param: bool = Field(True, description="Keep the parameter shards in CPU memory between uses.")
    offload_optimizer: bool = Field(True, description="Keep optimizer states on CPU and step them with DeepSpeedCPUAdam.")
    pin_memory: bool = Field(False, description="Page-locked CPU buffers for the offloads (faster GPU copies, more RAM).")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on GPUs that support it, fp32 otherwise (CPU)."
    )
    gather_16bit_weights_on_model_save: bool = Field(
        True, description="Must stay true: with it off, DeepSpeed saves empty adapters (peft#2892)."
    )
    load_in_4bit: QuantSpec | None = Field(
        None, description="Quantize the sharded base to 4 bits (QLoRA under ZeRO-3)."
    )

    @field_validator("gather_16bit_weights_on_model_save")
    @classmethod
    def _gather(cls, value: bool) -> bool:
        if not value:
            raise ValueError(
                "strategy.gather_16bit_weights_on_model_save must be true: with it off ZeRO-3 saves empty "
                "adapters (peft#2892); remove the key"
            )
        return value

    @model_validator(mode="after")
    def _quant_storage(self) -> "Zero3OffloadStrategy":
        quant = self.load_in_4bit
        if quant is None:
            return self
        if self.precision == "auto":
            raise ValueError(
                "strategy.precision must be set explicitly (bf16, fp16 or fp32) with strategy.load_in_4bit, "
                "and strategy.load_in_4bit.quant_storage must equal it"
            )
        wanted = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[self.precision]
        if quant.quant_storage != wanted:
            raise ValueError(
                f"strategy.load_in_4bit.quant_storage={quant.quant_storage} cannot be sharded by ZeRO-3 with "
                f"precision={self.precision}: set strategy.load_in_4bit.quant_storage: {wanted}"
            )
        return self


# The memory strategy is a union discriminated on `kind`; each member carries only
# its own fields. `pipeline.strategies.strategy_for` maps each to its implementation.
StrategySpec = Annotated[Union[LoraStrategy, QloraStrategy, Zero3OffloadStrategy], Field(discriminator="kind")]
STRATEGY_KINDS = ("lora", "qlora", "zero3_offload")
