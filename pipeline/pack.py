"""Packed trials: k adapter configs trained together on one frozen base (issue 17).

A pack shares the base model (and memory strategy), the data, the seed and the batch
schedule; its configs may differ in everything LoRA (rank, alpha, rsLoRA, dropout, target
modules, modules_to_save) and in their optimizer and LR schedule (`config.PACKABLE_PATHS`).

Each step every live adapter sees the same micro-batch: the batch is repeated k times along
the batch dimension and each LoRA layer adds, to slice i of the frozen layer's output, the
update of adapter i only (`_routed_lora_forward`). A `modules_to_save` copy (a classifier's
head and pooler) is routed the same way. PEFT holds the k adapters (`add_adapter`); its own
mixed-adapter batches (`adapter_names=`) refuse training, so the routing is ours.

Every adapter keeps its own loss, optimizer (its decay and no-decay groups), LR schedule,
gradient clipping, NaN guard and checkpoint: a packed config trains exactly like the same
config alone (tests/test_pack.py checks the tensors to 1e-5).
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from pipeline import adapters
from pipeline.config import ExperimentConfig
from pipeline.strategies import torch_optimizer


def member_name(index: int) -> str:
    """The PEFT adapter name (and checkpoint subfolder) of the pack's index-th config."""
    return f"c{index}"


class Routing:
    """Which slice of the (repeated) batch each adapter owns in the current forward."""

    def __init__(self) -> None:
        self.slices: list[tuple[str, slice]] = []

    def set(self, names: list[str], batch_size: int) -> None:
        self.slices = [(name, slice(i * batch_size, (i + 1) * batch_size)) for i, name in enumerate(names)]


def _routed_lora_forward(layer: nn.Module, routing: Routing, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """PEFT's LoRA forward (base + (alpha/r)·B·A·dropout(x)), with adapter i applied to slice i only."""
    result = layer.base_layer(x, *args, **kwargs)
    dtype = result.dtype
    parts = []
    for name, part in routing.slices:
        out = result[part]
        if name in layer.lora_A:
            lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
            xs = layer._cast_input_dtype(x[part], lora_a.weight.dtype)
            out = out + (lora_b(lora_a(layer.lora_dropout[name](xs))) * layer.scaling[name]).to(dtype)
        parts.append(out)
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _routed_saved_forward(wrapper: nn.Module, routing: Routing, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    """A `modules_to_save` module (head, pooler): adapter i's own trained copy on slice i."""
    parts = []
    for name, part in routing.slices:
        module = wrapper.modules_to_save[name] if name in wrapper.modules_to_save else wrapper.original_module
        parts.append(module(x[part], *args, **kwargs))
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _adapter_of(param_name: str, names: set[str]) -> str | None:
    parts = param_name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in ("lora_A", "lora_B", "modules_to_save") and parts[i + 1] in names:
            return parts[i + 1]
    return None


class PackedLora:
    """One frozen base with k PEFT adapters, forward-routed per batch slice."""

    def __init__(self, base: nn.Module, configs: list[ExperimentConfig]):
        from peft import get_peft_model
        from peft.tuners.lora import LoraLayer
        from peft.utils import ModulesToSaveWrapper

        self.configs = configs
        self.names = [member_name(i) for i in range(len(configs))]
        # each adapter starts from the RNG state a solo run of its config would see after loading the base,
        # so its A matrices (Gaussian/Kaiming init) are the solo run's
        rng = torch.get_rng_state()
        model = None
        for name, config in zip(self.names, configs):
            torch.set_rng_state(rng)
            lora = adapters.lora_config(config.lora, config.data, adapters.modules_to_save(base, config.lora, config.data),
                                        getattr(base.config, "model_type", ""))
            if model is None:
                model = get_peft_model(base, lora, adapter_name=name)
            else:
                model.add_adapter(name, lora)
        assert model is not None
        self.model = model
        self.routing = Routing()
        self.saved_wrappers = []
        for module in model.modules():
            if isinstance(module, LoraLayer):
                if not isinstance(module, nn.Module) or not hasattr(module, "base_layer") or module.lora_embedding_A:
                    raise ValueError(f"packing supports LoRA on linear layers only, not {type(module).__name__}")
                module.forward = functools.partial(_routed_lora_forward, module, self.routing)
            elif isinstance(module, ModulesToSaveWrapper):
                module.forward = functools.partial(_routed_saved_forward, module, self.routing)
        # PEFT trains only its active adapter; here every adapter trains, each through its own slice
        names = set(self.names)
        self.params: dict[str, list[nn.Parameter]] = {name: [] for name in self.names}
        self.named: dict[str, list[tuple[str, nn.Parameter]]] = {name: [] for name in self.names}
        for param_name, param in model.named_parameters():
            owner = _adapter_of(param_name, names)
            param.requires_grad_(owner is not None)
            if owner is not None:
                self.params[owner].append(param)
                self.named[owner].append((param_name, param))

    @property
    def hf_model(self) -> nn.Module:
        return self.model.get_base_model()

    def trainable(self, name: str) -> int:
        return sum(p.numel() for p in self.params[name])

    @contextlib.contextmanager
    def only(self, name: str) -> Iterator[None]:
        """Route a plain (unrepeated) batch through one adapter: evaluation."""
        saved = self.routing.slices
        self.routing.slices = [(name, slice(0, None))]
        try:
            yield
        finally:
            self.routing.slices = saved

    def losses(self, batch: dict[str, torch.Tensor], names: list[str], classification: bool) -> dict[str, torch.Tensor]:
        """One forward over the batch repeated len(names) times; each adapter's loss on its own slice."""
        size = batch["input_ids"].shape[0]
        self.routing.set(names, size)
        k = len(names)
        logits = self.model(input_ids=batch["input_ids"].repeat(k, 1),
                            attention_mask=batch["attention_mask"].repeat(k, 1)).logits
        labels = batch["labels"]
        hf = self.hf_model
        out = {}
        for name, part in self.routing.slices:
            if classification:
                # what the HF sequence-classification head computes for integer labels
                out[name] = nn.functional.cross_entropy(logits[part].view(-1, hf.config.num_labels), labels.view(-1))
            else:
                out[name] = hf.loss_function(logits=logits[part], labels=labels, vocab_size=hf.config.vocab_size)
        return out

    def state_dict_of(self, name: str) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(self.model, adapter_name=name)

    def save(self, name: str, adapter_dir: Path, metadata: dict[str, Any]) -> None:
        """A plain PEFT folder for one adapter (loadable with `PeftModel.from_pretrained` as `default`)."""
        import json

        from safetensors.torch import save_file

        adapter_dir = Path(adapter_dir)
        adapter_dir.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict_of(name).items()}
        save_file(state, str(adapter_dir / adapters.ADAPTER_WEIGHTS), metadata={"format": "pt"})
        peft_config = self.model.peft_config[name]
        inference = peft_config.inference_mode
        peft_config.inference_mode = True
        try:
            peft_config.save_pretrained(str(adapter_dir))
        finally:
            peft_config.inference_mode = inference
        (adapter_dir / adapters.METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True))

    def load(self, name: str, adapter_dir: Path) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(self.model, load_file(str(Path(adapter_dir) / adapters.ADAPTER_WEIGHTS)), adapter_name=name)


# ---------------------------------------------------------------------------------------- one member


@dataclass
class Member:
    """One config of a pack and its own training state."""

    name: str
    config: ExperimentConfig
    sampled: dict[str, Any]
    optimizer: torch.optim.Optimizer | None = None
    scheduler: Any = None
    status: str = "LIVE"  # LIVE, then DONE (trained to the end), STOPPED (halved out) or ERROR (non-finite loss)
    stopped_step: int | None = None
    rung: int | None = None
    error: str | None = None
    run_id: str | None = None
    metric_buffer: Any = None
    window: list[float] = field(default_factory=list)

    @property
    def live(self) -> bool:
        return self.status == "LIVE"


def member_optimizer(pack: PackedLora, member: Member) -> torch.optim.Optimizer:
    """The optimizer a solo run of the config builds: AdamW (or paged), decay and no-decay groups."""
    train = member.config.train
    decay = [p for p in pack.params[member.name] if p.ndim >= 2]
    no_decay = [p for p in pack.params[member.name] if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch_optimizer(train.optimizer, groups, train.lr)


def clip_and_step(pack: PackedLora, member: Member) -> float | None:
    """This adapter's own clip (its own grad norm), optimizer step and LR step."""
    grad_norm = None
    max_norm = member.config.train.max_grad_norm
    if max_norm is not None:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(pack.params[member.name], max_norm))
    member.optimizer.step()
    member.optimizer.zero_grad(set_to_none=True)
    member.scheduler.step()
    return grad_norm


# ---------------------------------------------------------------------------------------- halving


def rung_steps(eval_every_steps: int, total_steps: int, grace_period: int, reduction_factor: int) -> list[int]:
    """Steps at which live configs are compared: grace·η^i evaluations, below the last step."""
    rungs, evals = [], grace_period
    while evals * eval_every_steps < total_steps:
        rungs.append(evals * eval_every_steps)
        evals *= reduction_factor
    return rungs


def survivors(scores: dict[str, float], reduction_factor: int, mode: str) -> list[str]:
    """The top ceil(n/η) of the live configs at a rung (at least one); ties keep the earlier config."""
    keep = max(1, math.ceil(len(scores) / reduction_factor))
    names = list(scores)

    def rank(name: str) -> tuple[float, int]:
        value = scores[name]
        if value is None or math.isnan(value):
            return math.inf, names.index(name)  # no score ranks last
        return (-value if mode == "max" else value), names.index(name)

    order = sorted(names, key=rank)
    return order[:keep]


def backward(pack: PackedLora, members: list[Member], batch: dict[str, torch.Tensor], grad_accum: int,
             classification: bool, step: int) -> dict[str, float]:
    """One micro-batch for every live member: forward, NaN guard, backward of the sum of their losses.

    The adapters share no trainable tensor, so the gradient of the sum is, for each adapter, the
    gradient of its own loss. A non-finite loss stops its member (ERROR), not the pack.
    """
    live = [m for m in members if m.live]
    losses = pack.losses(batch, [m.name for m in live], classification)
    total, values = None, {}
    for member in live:
        loss = losses[member.name] / grad_accum
        if not torch.isfinite(loss.detach()).all():
            member.status, member.stopped_step = "ERROR", step
            member.error = (f"non-finite loss at step {step}; its last checkpoint is at or before step {step}. "
                            "Lower train.lr or check the data")
            member.optimizer.zero_grad(set_to_none=True)
            continue
        values[member.name] = float(loss.detach()) * grad_accum
        total = loss if total is None else total + loss
    if total is not None:
        total.backward()
    return values
