"""Memory measurements the memory benchmarks (B4, B6) share: process RSS now and at its peak, and the exact
bytes a frozen base's weights take, quantization constants included."""

from __future__ import annotations

import resource
from pathlib import Path


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def resident_mib() -> float:
    """Resident memory right now, as it stands (cheap enough to sample every few milliseconds)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**20


def rss_now_mib() -> float:
    """Resident memory right now (after gc): steady state, unlike the peak, which loading dominates."""
    import gc

    gc.collect()
    return resident_mib()


def causal_config(model_dir: str, name: str):
    """A minimal causal-LM experiment on a saved model folder (the data only names files; nothing trains)."""
    from pipeline.config import ExperimentConfig
    from pipeline.datafiles import require

    return ExperimentConfig.model_validate({
        "name": name, "model": {"name_or_path": model_dir},
        "data": {"kind": "data_to_text", "train_path": str(require("e2e/train.jsonl")),
                 "eval_path": str(require("e2e/dev.jsonl"))},
    })


def load_frozen_base(config, kind: str, device):
    """The frozen base through the product's loaders: `bf16`, or 4-bit NF4 (`nf4`) or NF4 + double
    quantization (`nf4_dq`) with bf16 compute and bf16 for the layers left unquantized."""
    import torch

    from pipeline import adapters, strategies
    from pipeline.config import QuantSpec

    if kind == "bf16":
        return adapters.load_base_model(config.model, config.data, dtype=torch.bfloat16).to(device)
    quant = QuantSpec(quant_type="nf4", double_quant=kind == "nf4_dq", compute_dtype="bfloat16")
    return strategies.load_quantized_base(config, quant, device, dtype=torch.bfloat16)


def base_bytes(model) -> dict:
    """Bytes the frozen base's weights take, per logical parameter: all of it, and its linear layers only."""
    total_bytes = total_params = linear_bytes = linear_params = 0
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if "lora_" in module_name or "modules_to_save" in module_name:
                continue  # the adapters and the trained head copies are not the base
            state = getattr(param, "quant_state", None)
            nbytes = param.numel() * param.element_size()
            logical = param.numel()
            if hasattr(param, "ds_tensor"):  # ZeRO-3: this worker holds only its partition
                nbytes = param.ds_tensor.numel() * param.ds_tensor.element_size()
                logical = param.ds_numel
            elif state is not None:
                logical = int(torch_prod(state.shape))
                nbytes += state_bytes(state)
            total_bytes += nbytes
            total_params += logical
            # the transformer's linear layers (the output head stays unquantized under QLoRA)
            if type(module).__name__ in ("Linear", "Linear4bit") and name == "weight" and "lm_head" not in module_name:
                linear_bytes += nbytes
                linear_params += logical
    return {"bytes_per_param": total_bytes / total_params, "linear_bytes_per_param": linear_bytes / linear_params,
            "base_mib": total_bytes / 2**20, "base_params": total_params}


def torch_prod(shape) -> int:
    out = 1
    for dim in shape:
        out *= int(dim)
    return out


def state_bytes(state) -> int:
    """absmax (8-bit with DQ) + the second-level constants and code books of a bitsandbytes QuantState."""
    nbytes = state.absmax.numel() * state.absmax.element_size()
    if state.nested:
        nbytes += state.state2.absmax.numel() * state.state2.absmax.element_size()
        nbytes += state.state2.code.numel() * state.state2.code.element_size()
    return nbytes
