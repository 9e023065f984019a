"""Does the adapter apply? Checked on a few probe inputs before a version is scored.

lm-eval users found adapter evaluations equal to the base to the digit (an adapter path silently
ignored); an adapter saved empty (ZeRO-3 without gathered weights, peft#2892) or never trained has
B = 0 everywhere, so B·A changes nothing. Scoring such a version compares two copies of the base.
So, on the first eval rows, the eval stage checks each adapter model:

1. it is a PEFT model with LoRA layers attached;
2. not every `lora_B` is zero (B is zero at initialisation: an adapter that was never trained);
3. its logits differ from its base's (the same model with the adapter disabled) beyond a small
   tolerance: the adapter changes the model;
4. a merged copy (W0 + (alpha/r)·B·A folded in, as `loraforge export` writes it; for a 4-bit base,
   merged into the dequantized weights the adapter trained against) gives the unmerged logits:
   the export parity check (to 1e-4 of the logits' scale; for a 4-bit base, whose bf16 compute
   differs from the dequantized fp32 merge, to a quarter of the adapter's own effect).

A model that fails is not scored; the stage reports it failed with the reason.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline import export, strategies
from pipeline.config import ExperimentConfig

PROBES = 4
# logits differences relative to the logits' own scale (max |logit|, at least 1)
MIN_EFFECT = 1e-5  # below this, the adapter changes nothing
MAX_MERGE_DIFF = 1e-4  # merged vs unmerged, full-precision base
# merged into the dequantized weights vs the 4-bit base computing in bf16/fp16: the difference grows with the
# model's depth (3.6e-2 on SmolLM2-135M's 30 layers), so it is bounded by a share of the adapter's own effect
MERGE_SHARE_4BIT = 0.25


@dataclass
class AdapterCheck:
    ok: bool
    reason: str | None
    lora_layers: int = 0
    zero_b_layers: int = 0
    effect: float = 0.0  # max |adapter - base| over the probes' logits, relative
    merge_diff: float = 0.0  # max |merged - unmerged|, relative
    probes: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def lora_b_weights(model: nn.Module) -> list[torch.Tensor]:
    """Every LoRA layer's B matrix (the adapter's `lora_B.<name>.weight` parameters)."""
    return [p for name, p in model.named_parameters() if ".lora_B." in name and name.endswith(".weight")]


def merged_copy(config: ExperimentConfig, model: nn.Module, adapter_dir: Path) -> nn.Module:
    """The adapter folded into its base, as `loraforge export` merges it; `model` is left as it was."""
    # a copy to use up: a 4-bit model does not deep-copy, so it is loaded a second time
    copied = copy.deepcopy(model) if strategies.quant_spec(config) is None else strategies.load_trained(config, adapter_dir)
    return export.merged_model(config, copied, adapter_dir)


def check(config: ExperimentConfig, model: nn.Module, tokenizer: Any, adapter_dir: Path) -> AdapterCheck:
    """The four checks above, in order; the first that fails gives the reason."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return AdapterCheck(False, f"{adapter_dir}: no adapter is attached (the model loaded is the bare base)")
    b_weights = lora_b_weights(model)
    zero = sum(1 for b in b_weights if b.numel() == 0 or not bool(b.detach().ne(0).any()))
    result = AdapterCheck(True, None, lora_layers=len(b_weights), zero_b_layers=zero)
    if not b_weights:
        result.ok, result.reason = False, f"{adapter_dir}: no LoRA layer is attached (no lora_B weight in the model)"
        return result
    if zero == len(b_weights):
        result.ok, result.reason = False, (
            f"{adapter_dir}: every lora_B of its {len(b_weights)} LoRA layers is zero, so B·A adds nothing: the "
            "adapter was never trained, or was saved empty (ZeRO-3 without gather_16bit_weights_on_model_save)")
        return result
    batch = export.sample_batch(config, tokenizer, PROBES)  # the first eval rows, tokenized as training saw them
    result.probes = int(batch["input_ids"].shape[0])
    with_adapter = export.logits(model, batch)
    with model.disable_adapter():
        base = export.logits(model, batch)
    scale = max(1.0, float(base.abs().max()))
    result.effect = float((with_adapter - base).abs().max()) / scale
    if result.effect <= MIN_EFFECT:
        result.ok, result.reason = False, (
            f"{adapter_dir}: the adapter does not change the model: on {result.probes} eval rows its logits equal "
            f"the base's (max relative difference {result.effect:.2e} <= {MIN_EFFECT:g})")
        return result
    merged = merged_copy(config, model, adapter_dir)
    result.merge_diff = float((export.logits(merged, batch) - with_adapter).abs().max()) / scale
    del merged
    limit = MAX_MERGE_DIFF if strategies.quant_spec(config) is None else MERGE_SHARE_4BIT * result.effect
    if result.merge_diff > limit:
        result.ok, result.reason = False, (
            f"{adapter_dir}: merged into its base the adapter gives other logits than unmerged (max relative "
            f"difference {result.merge_diff:.2e} > {limit:.2e}): the export would not be this model")
    return result
