"""The memory seam: how a worker holds the frozen base, steps the adapters and saves them.

The train loop calls only `MemoryStrategy` methods and never branches on the
strategy kind; `strategy_for` is the one `match` on it. Plain LoRA lives here;
ZeRO-3 offload and QLoRA are further implementations of the same protocol.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from pipeline import adapters
from pipeline.config import ExperimentConfig, LoraStrategy


class MemoryStrategy(Protocol):
    """What the train loop needs from a memory strategy."""

    def load_model(self) -> nn.Module:
        """Base + LoRA, placed and wrapped for this worker (DDP, DeepSpeed engine, ...)."""

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """Optimizer over the trainable (adapter + head) parameters only."""

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate one micro-batch's loss (already divided by grad_accum)."""

    def step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> float | None:
        """Clip, apply one optimizer step, zero grads; returns the pre-clip grad norm if computed."""

    def save_adapter(self, model: nn.Module, adapter_dir: Path, metadata: dict[str, Any]) -> None:
        """Write the PEFT folder with real (gathered) weights.

        Called on every rank (sharded strategies gather collectively); only rank 0 writes.
        """


class PlainLora:
    """Full-precision frozen base on every worker; DDP all-reduces adapter grads across workers."""

    def __init__(self, config: ExperimentConfig):
        self.config = config

    def load_model(self) -> nn.Module:
        import ray.train.torch

        base = adapters.load_base_model(self.config.model, self.config.data)
        model = adapters.attach_lora(base, self.config.lora, self.config.data)
        # moves to the worker's device and wraps in DDP when world size > 1
        return ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": False})

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        train = self.config.train
        decay, no_decay = [], []
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            # biases and norms are not decayed (standard AdamW practice)
            (no_decay if param.ndim < 2 else decay).append(param)
        groups = [
            {"params": decay, "weight_decay": train.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=train.lr)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> float | None:
        grad_norm = None
        if self.config.train.max_grad_norm is not None:
            params = [p for p in model.parameters() if p.requires_grad]
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.config.train.max_grad_norm))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def save_adapter(self, model: nn.Module, adapter_dir: Path, metadata: dict[str, Any]) -> None:
        import ray.train

        if ray.train.get_context().get_world_rank() == 0:
            adapters.save_adapter(model, adapter_dir, metadata)


def strategy_for(config: ExperimentConfig) -> MemoryStrategy:
    """The one place that looks at `strategy.kind`."""
    match config.strategy:
        case LoraStrategy():
            return PlainLora(config)
    raise TypeError(f"unknown strategy {config.strategy!r}")
