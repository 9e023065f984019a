"""Which configs share a pack, how many per pack, how many packs at once (pipeline.pack).

The memory planner estimates, per device, what a pack of k configs holds:
- the frozen base, once: bytes/param by strategy (fp32 4; NF4 about 0.52 with double
  quantization, the unquantized norms, embeddings and head in fp32);
- per config, its trainable tensors (LoRA A and B, the `modules_to_save` copies): weights,
  gradients and two Adam moments, 16 bytes/param (10 with 8-bit paged AdamW);
- per config, the activations its slice of the repeated batch keeps for backward at
  `train.batch_size` x `data.max_seq_len` (a per-layer count of the saved tensors of a
  transformer block, plus the logits of a causal LM).
`auto` packs as many compatible configs as fit in the budget and as balance the packs over the
cluster's devices; an explicit k that does not fit, or a config that cannot fit alone, is
refused with the numbers. tests/test_pack.py checks the estimate against measured peak RSS.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from typing import Any

from pipeline import adapters
from pipeline.config import PACKABLE_PATHS, ConfigError, ExperimentConfig
from pipeline.sweep.space import grid_points, tune_domain

GiB = 1024**3
log = logging.getLogger("loraforge")


def packable(path: str) -> bool:
    return any(path.startswith(p) if p.endswith(".") else path == p for p in PACKABLE_PATHS)


@dataclass
class Estimate:
    base_bytes: int
    adapter_bytes: list[int]      # per config: weights + grads + optimizer states
    activation_bytes: list[int]   # per config: its slice's saved activations

    def total(self) -> int:
        return self.base_bytes + sum(self.adapter_bytes) + sum(self.activation_bytes)

    def per_config(self) -> list[int]:
        return [a + b for a, b in zip(self.adapter_bytes, self.activation_bytes)]


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def estimate(configs: list[ExperimentConfig]) -> Estimate:
    """The memory a pack of `configs` (one shared base) needs on its device, from the model's skeleton."""
    import torch
    from torch import nn

    first = configs[0]
    skeleton = adapters.model_skeleton(first.model, first.data)
    heads = set(adapters.head_modules(skeleton)) if adapters.is_classification(first.data) else set()
    linear = other = 0
    for name, module in skeleton.named_modules():
        direct = sum(p.numel() for p in module.parameters(recurse=False))
        in_head = name.split(".")[0] in heads or name.rsplit(".", 1)[-1] in heads
        if isinstance(module, nn.Linear) and not in_head and first.strategy.kind == "qlora":
            linear += direct
        else:
            other += direct
    # NF4: 4 bits + one fp32 absmax per 64 (8-bit absmax + a second level with double quantization)
    nf4 = 0.5 + (1.0 / 64 + 4.0 / (64 * 256) if getattr(first.strategy, "double_quant", False) else 4.0 / 64)
    base = int(linear * nf4 + other * 4)

    hf = skeleton.config
    hidden = getattr(hf, "hidden_size", None) or getattr(hf, "n_embd", 768)
    layers = getattr(hf, "num_hidden_layers", None) or getattr(hf, "n_layer", 12)
    heads_n = getattr(hf, "num_attention_heads", None) or getattr(hf, "n_head", 12)
    ffn = getattr(hf, "intermediate_size", None) or 4 * hidden
    vocab = getattr(hf, "vocab_size", 0)
    modules = dict(skeleton.named_modules())
    adapter_bytes, activation_bytes = [], []
    for config in configs:
        targets = adapters.resolve_targets(config.lora.target_modules, getattr(hf, "model_type", ""))
        lora_params = 0
        for name, module in modules.items():
            if not isinstance(module, nn.Linear) or name.split(".")[0] in heads:
                continue
            if adapters.targets_match(name, targets):
                # A and B; DoRA adds a magnitude per output feature
                lora_params += config.lora.r * (module.in_features + module.out_features)
                lora_params += module.out_features if config.lora.use_dora else 0
        saved = adapters.modules_to_save(skeleton, config.lora, config.data) or []
        saved_params = sum(p.numel() for n, m in modules.items() if n and n.rsplit(".", 1)[-1] in saved
                           and n.count(".") <= 1 for p in m.parameters())
        per_param = 10 if config.train.optimizer == "paged_adamw_8bit" else 16
        adapter_bytes.append((lora_params + saved_params) * per_param)
        tokens = config.train.batch_size * config.data.max_seq_len
        # per block: ~10 hidden-sized tensors (inputs of the projections, norms, residuals), 2 ffn-sized
        # (pre/post activation), 3 attention maps per head (scores, probabilities, dropout mask)
        per_layer = tokens * (10 * hidden + 2 * ffn) + 3 * config.train.batch_size * heads_n * config.data.max_seq_len**2
        act = layers * per_layer * 4
        if not adapters.is_classification(config.data):
            act += tokens * vocab * 4 * 3  # logits, their float copy for the loss, its gradient
        activation_bytes.append(int(act))
    del torch
    return Estimate(base, adapter_bytes, activation_bytes)


def fits(est: Estimate, budget: float) -> int:
    """How many of the estimate's configs fit beside the base (taking the largest first: a safe bound)."""
    used, n = est.base_bytes, 0
    for cost in sorted(est.per_config(), reverse=True):
        if used + cost > budget:
            break
        used, n = used + cost, n + 1
    return n


def memory_budget(config: ExperimentConfig, resources: Any, cpus_per_pack: float) -> float:
    """Bytes one pack may use: sweep.pack_memory_gib, else its share of the node's RAM (CPU) or 90 % of the
    GPU (when this process sees one)."""
    if config.sweep.pack_memory_gib is not None:
        return config.sweep.pack_memory_gib * GiB
    if config.train.gpus_per_worker > 0:
        import torch

        if torch.cuda.is_available():
            return 0.9 * torch.cuda.get_device_properties(0).total_memory * config.train.gpus_per_worker
        return 0.0  # unknown device memory: auto does not pack (set sweep.pack_memory_gib)
    share = cpus_per_pack / max(resources.max_node_cpus, 1)
    return 0.7 * resources.max_node_memory * share


def sample_points(config: ExperimentConfig) -> list[dict[str, Any]]:
    """Every config of a packable sweep, in the order it would run: the grid (listed or shuffled by the
    seed) x num_samples, or num_samples seeded draws of a random search."""
    import random

    import numpy as np

    spec = config.sweep
    if spec.searcher == "grid":
        points = grid_points(spec) * spec.num_samples
        if spec.grid_order == "shuffled":
            random.Random(config.train.seed).shuffle(points)
        return points or [{}]
    state = np.random.RandomState(config.train.seed)
    points = []
    for _ in range(spec.num_samples):
        point = {}
        for path, domain in spec.parameters.items():
            value = tune_domain(domain, "random")
            value = value["grid_search"][state.randint(len(value["grid_search"]))] if isinstance(value, dict) \
                else value.sample(random_state=state)
            point[path] = value.item() if hasattr(value, "item") else value
        points.append(point)
    return points


@dataclass
class PackPlan:
    packs: list[list[dict[str, Any]]]  # the sampled values of each pack's configs
    concurrency: int                   # packs at once
    cpus_per_pack: int
    estimate_lines: list[str]

    @property
    def size(self) -> int:
        return max(len(p) for p in self.packs)


def why_not_packed(config: ExperimentConfig) -> str | None:
    """Why `auto` trains one config per trial here (None: it packs)."""
    spec = config.sweep
    if spec.pack_size == 1:
        return "sweep.pack_size: 1"
    if spec.scheduler in ("median", "pbt"):
        return f"scheduler {spec.scheduler}"
    if spec.searcher == "optuna":
        return "searcher optuna"
    if config.strategy.kind == "zero3_offload":
        return "strategy zero3_offload"
    if config.train.num_workers > 1:
        return "train.num_workers > 1"
    return None


def plan(config: ExperimentConfig, resources: Any) -> PackPlan | None:
    """The packs of a sweep (None: one trial per config); ConfigError with the numbers when they cannot fit."""
    if why_not_packed(config) is not None:
        return None
    points = sample_points(config)
    trial_configs = [config.trial_config(p) for p in points]  # validated once, for the reasons and the estimates
    apart = {reason for c in trial_configs if (reason := c.lora.packs_apart)}
    if apart:
        # pipeline.pack's routed layers and per-config optimizers run plain LoRA; such configs train one per trial
        log.info("sweep.pack_size %s: one config per trial, since %s", config.sweep.pack_size, "; ".join(sorted(apart)))
        return None
    groups: dict[str, list[dict[str, Any]]] = {}
    configs_of: dict[str, list[ExperimentConfig]] = {}
    for point, trial_config in zip(points, trial_configs):
        key = json.dumps({p: v for p, v in point.items() if not packable(p)}, sort_keys=True, default=str)
        groups.setdefault(key, []).append(point)
        configs_of.setdefault(key, []).append(trial_config)
    if max(len(g) for g in groups.values()) == 1 and config.sweep.pack_size == "auto":
        return None  # nothing to share
    train = config.train
    gpu = train.gpus_per_worker > 0
    # packs on CPUs pool a node's cores in one worker; on GPUs a pack is one device
    slots = int(resources.gpus // train.gpus_per_worker) if gpu else int(resources.cpus // train.cpus_per_worker)
    device_slots = slots if gpu else max(1, resources.nodes)
    # balanced: every device gets about as many configs (64 configs on 8 GPUs: packs of 8)
    balance = math.ceil(len(points) / device_slots)
    lines, packs = [], []
    for key, group in groups.items():
        configs = configs_of[key]
        # the cores this group's packs will get (for their share of the RAM)
        n_packs = math.ceil(len(group) / max(1, min(balance, len(group))))
        cpus = train.cpus_per_worker if gpu else min(
            int(resources.max_node_cpus), train.cpus_per_worker * max(1, slots // n_packs))
        est = estimate(configs)
        budget = memory_budget(config, resources, cpus)
        can = fits(est, budget)
        numbers = (f"base {_gib(est.base_bytes)} + per config {_gib(max(est.per_config()))} (adapter, grads and "
                   f"optimizer {_gib(max(est.adapter_bytes))}, activations {_gib(max(est.activation_bytes))}) "
                   f"against {_gib(budget)} per pack")
        if can == 0 and budget > 0:
            raise ConfigError([f"sweep.pack_size: not even one config fits: {numbers}; lower train.batch_size or "
                               "data.max_seq_len, or set sweep.pack_memory_gib"])
        if config.sweep.pack_size == "auto":
            k = max(1, min(can, balance, len(group)))
        else:
            k = config.sweep.pack_size
            if k > can:
                raise ConfigError([f"sweep.pack_size: {k} configs do not fit in one pack, at most {can} do: {numbers}; "
                                   f"lower pack_size (or use auto), train.batch_size or data.max_seq_len"])
        lines.append(f"{len(group)} configs -> packs of <= {k}: {numbers}")
        packs += [group[i:i + k] for i in range(0, len(group), k)]
    concurrency = max(1, min(len(packs), slots, config.sweep.max_concurrent_trials or slots))
    # fewer packs than CPU slots: each pack's worker takes the idle slots' cores as threads
    cpus_per_pack = train.cpus_per_worker if gpu else min(int(resources.max_node_cpus),
                                                          train.cpus_per_worker * max(1, slots // concurrency))
    return PackPlan(packs, concurrency, cpus_per_pack, lines)
