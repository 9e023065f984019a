"""Memory measurements the memory benchmarks (B4, B6) share: process RSS now and at its peak, and the exact
bytes a frozen base's weights take, quantization constants included."""

from __future__ import annotations

import resource
from pathlib import Path


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_now_mib() -> float:
    """Resident memory right now (after gc): steady state, unlike the peak, which loading dominates."""
    import gc

    gc.collect()
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


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
