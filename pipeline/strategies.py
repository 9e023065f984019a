"""The memory seam: how a worker holds the frozen base, steps the adapters and saves them.

The train loop calls only `MemoryStrategy` methods and never branches on the
strategy kind; `strategy_for` is the one `match` on it. Three implementations:

- `PlainLora`: full-precision base on every worker, DDP across workers.
- `Qlora`: bitsandbytes 4-bit (NF4 + double quantization) base, LoRA in full
  precision on top, optional paged AdamW; DDP across workers.
- `Zero3Offload`: DeepSpeed ZeRO-3, the base sharded across the trial's workers
  and offloaded to CPU, optimizer states stepped by DeepSpeedCPUAdam.

Strategies take a `Worker` (rank, world size, device) instead of asking Ray, so
the same code runs in a bench script or an export outside Ray Train.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from pipeline import adapters, oplocks
from pipeline.config import ExperimentConfig, LoraStrategy, QloraStrategy, QuantSpec, Zero3OffloadStrategy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Worker:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")


class MemoryStrategy(Protocol):
    """What the train loop needs from a memory strategy, in the order it calls them."""

    def load_base(self) -> nn.Module:
        """The frozen base alone, as this strategy holds it (a pack attaches its k adapters to it)."""

    def load_model(self) -> nn.Module:
        """The PEFT model (base + LoRA, unwrapped) on this worker's device; adapters may be loaded into it next."""

    def wrap(self, model: nn.Module) -> tuple[nn.Module, torch.optim.Optimizer]:
        """(what the loop calls forward on, the optimizer whose param groups the LR schedule drives)."""

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate one micro-batch's loss (already divided by grad_accum)."""

    def step(self) -> float | None:
        """At a grad-accumulation boundary: clip, step, zero grads; the pre-clip grad norm if known."""

    def optimizer_state(self) -> dict[str, Any]:
        """This rank's optimizer state, tensors and plain values only (saved as safetensors)."""

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        """Restore what `optimizer_state` returned on this rank."""

    def save_adapter(self, adapter_dir: Path, metadata: dict[str, Any]) -> None:
        """Write the PEFT folder with the real (gathered) weights. Collective: every rank calls it, rank 0 writes."""

    def step_metrics(self) -> dict[str, float]:
        """Strategy-specific health numbers to log (e.g. DeepSpeed's skipped steps)."""


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if param.requires_grad:
            # biases and norms are not decayed (standard AdamW practice)
            (no_decay if param.ndim < 2 else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    match name:
        case "adamw":
            return torch.optim.AdamW
        case "paged_adamw_32bit":
            import bitsandbytes as bnb

            return bnb.optim.PagedAdamW32bit
        case "paged_adamw_8bit":
            import bitsandbytes as bnb

            return bnb.optim.PagedAdamW8bit
    raise ValueError(f"unknown optimizer {name!r}")


def torch_optimizer(name: str, groups: list[dict[str, Any]], lr: float) -> torch.optim.Optimizer:
    return optimizer_class(name)(groups, lr=lr)


def adapter_optimizer(model: nn.Module, config: ExperimentConfig, cls: type | None = None, **kwargs: Any) -> Any:
    """The trainable parameters' optimizer: decay and no-decay groups at train.lr, or with `lora.loraplus_lr_ratio`
    PEFT's LoRA+ groups (B and the 1-d parameters at ratio x train.lr)."""
    train, ratio = config.train, config.lora.loraplus_lr_ratio
    cls = cls or optimizer_class(train.optimizer)
    if ratio is None:
        return cls(_param_groups(model, train.weight_decay), lr=train.lr, **kwargs)
    from peft.optimizers import create_loraplus_optimizer

    return create_loraplus_optimizer(adapters.unwrap(model), cls, lr=train.lr, loraplus_lr_ratio=ratio,
                                     loraplus_weight_decay=train.weight_decay, **kwargs)


class _DataParallel:
    """Shared by the strategies whose base is replicated: DDP wrap, clip + step, rank-0 save."""

    def __init__(self, config: ExperimentConfig, worker: Worker):
        self.config, self.worker = config, worker

    def wrap(self, model: nn.Module) -> tuple[nn.Module, torch.optim.Optimizer]:
        self.model = model
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = adapter_optimizer(model, self.config)
        wrapped = model
        if self.worker.world_size > 1:
            device_ids = [self.worker.device] if self.worker.device.type == "cuda" else None
            wrapped = nn.parallel.DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=False)
        return wrapped, self.optimizer

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float | None:
        grad_norm = None
        if self.config.train.max_grad_norm is not None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.trainable, self.config.train.max_grad_norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def optimizer_state(self) -> dict[str, Any]:
        # replicas hold identical states; rank 0's is enough
        return self.optimizer.state_dict() if self.worker.rank == 0 else {}

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        if state:
            self.optimizer.load_state_dict(state)

    def save_adapter(self, adapter_dir: Path, metadata: dict[str, Any]) -> None:
        if self.worker.rank == 0:
            adapters.save_adapter(self.model, adapter_dir, metadata)

    def step_metrics(self) -> dict[str, float]:
        return {}


class PlainLora(_DataParallel):
    """Full-precision frozen base on every worker; DDP all-reduces adapter grads across workers."""

    def load_base(self) -> nn.Module:
        """The frozen base alone, on this worker's device (a pack attaches its k adapters to it)."""
        return adapters.load_base_model(self.config.model, self.config.data).to(self.worker.device)

    def load_model(self) -> nn.Module:
        return adapters.attach_lora(self.load_base(), self.config.lora, self.config.data).to(self.worker.device)


def bnb_config(quant: QuantSpec, skip_modules: list[str] | None) -> Any:
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, quant.compute_dtype),
        bnb_4bit_quant_storage=getattr(torch, quant.quant_storage),
        llm_int8_skip_modules=skip_modules,
    )


def check_quant_device(quant: QuantSpec, device: torch.device) -> None:
    """A ValueError naming the fix when this GPU cannot run the 4-bit settings (CPU runs them, slowly)."""
    if device.type != "cuda":
        return
    major, minor = torch.cuda.get_device_capability(device)
    name = torch.cuda.get_device_name(device)
    if (major, minor) < (6, 0):
        raise ValueError(f"4-bit QLoRA requires CUDA compute capability >= 6.0; found {major}.{minor} ({name})")
    if quant.compute_dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"strategy compute_dtype=bfloat16 but {name} (compute capability {major}.{minor}) has no bf16; "
                         "set compute_dtype: float16")


def load_quantized_base(config: ExperimentConfig, quant: QuantSpec, device: torch.device,
                        dtype: torch.dtype = torch.float32) -> nn.Module:
    """The base with its linear layers in 4 bits; the classification head (trained in full) stays unquantized."""
    check_quant_device(quant, device)
    skip = None
    if adapters.is_classification(config.data):
        skeleton = adapters.model_skeleton(config.model, config.data)
        heads = adapters.head_modules(skeleton)
        # full module paths: transformers matches skip patterns from the start of a name or as a suffix
        skip = [name for name, _ in skeleton.named_modules() if name and name.rsplit(".", 1)[-1] in heads]
    model = adapters.load_base_model(
        config.model, config.data, dtype=dtype,
        quantization_config=bnb_config(quant, skip), device_map={"": device},
    )
    for module in model.modules():
        # bitsandbytes 0.50 repacks 4-bit weights for its AVX512-BF16 CPU kernel the first
        # time a layer runs in eval mode; training forwards after that fail ("a view of a
        # leaf Variable ... in-place"), and eval would compute in bf16, not compute_dtype
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


class Qlora(_DataParallel):
    """4-bit frozen base (bitsandbytes) on every worker, LoRA adapters in full precision, DDP across workers."""

    def __init__(self, config: ExperimentConfig, worker: Worker):
        super().__init__(config, worker)
        self.spec: QloraStrategy = config.strategy  # type: ignore[assignment]

    def load_base(self) -> nn.Module:
        """The 4-bit frozen base alone (a pack attaches its k adapters to it)."""
        from peft import prepare_model_for_kbit_training

        if self.worker.device.type == "cpu" and self.worker.rank == 0:
            log.warning("QLoRA on CPU: bitsandbytes dequantizes every 4-bit matmul on the CPU; expect slow steps")
        base = load_quantized_base(self.config, self.spec, self.worker.device)
        # casts the remaining full-precision layers (norms, embeddings) to fp32 and, if asked,
        # turns on gradient checkpointing with input grads enabled
        return prepare_model_for_kbit_training(base, use_gradient_checkpointing=self.spec.gradient_checkpointing)

    def load_model(self) -> nn.Module:
        base = self.load_base()
        return adapters.attach_lora(base, self.config.lora, self.config.data)


def quant_spec(config: ExperimentConfig) -> QuantSpec | None:
    """The 4-bit settings of the frozen base, if the strategy quantizes it."""
    match config.strategy:
        case QloraStrategy():
            return config.strategy
        case Zero3OffloadStrategy(load_in_4bit=quant):
            return quant
    return None


def inference_base(config: ExperimentConfig, device: torch.device = torch.device("cpu")) -> nn.Module:
    """The frozen base as the trials trained against it: 4-bit for QLoRA, full precision otherwise.

    Weights the checkpoint lacks (a classifier's new head) are drawn from `train.seed`, so the base row of
    an evaluation is the same in every run of a config; the caller's random state is left as it was."""
    quant = quant_spec(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.train.seed)
        if quant is None:
            return adapters.load_base_model(config.model, config.data).to(device)
        return load_quantized_base(config, quant, device)


def load_trained(config: ExperimentConfig, adapter_dir: Path | None = None,
                 device: torch.device = torch.device("cpu")) -> nn.Module:
    """The one way to load "the base as the trials trained against it, plus an adapter": `inference_base` with the
    PEFT folder on top via `PeftModel.from_pretrained` (or the base alone), in eval mode. The eval stage, the
    registered pyfunc, the registry re-score and export all load through it."""
    base = inference_base(config, device)
    if adapter_dir is None:
        return base.eval()
    # PEFT puts each LoRA layer on its base layer's device
    return adapters.load_adapter_model(adapter_dir, config.model, config.data, base=base).eval()


ZERO3_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def zero3_precision(spec: Zero3OffloadStrategy, device: torch.device) -> str:
    """bf16/fp16/fp32 for this device; a ValueError naming the fix when the device cannot do it."""
    if spec.precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp32"
    if spec.precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        major, minor = torch.cuda.get_device_capability(device)
        raise ValueError(
            f"strategy.precision=bf16 but {torch.cuda.get_device_name(device)} (compute capability {major}.{minor}) "
            "has no bf16; use precision: fp16 or auto"
        )
    return spec.precision


def deepspeed_config(config: ExperimentConfig, world_size: int, precision: str) -> dict[str, Any]:
    """The DeepSpeed config, derived from the experiment config: one source of truth for batch sizes."""
    spec: Zero3OffloadStrategy = config.strategy  # type: ignore[assignment]
    train = config.train

    def offload(enabled: bool) -> dict[str, Any]:
        return {"device": "cpu", "pin_memory": spec.pin_memory} if enabled else {"device": "none"}

    return {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.batch_size * train.grad_accum * world_size,
        "gradient_clipping": train.max_grad_norm or 0.0,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "zero_optimization": {
            "stage": 3,
            "offload_param": offload(spec.offload_param),
            "offload_optimizer": offload(spec.offload_optimizer),
            "stage3_gather_16bit_weights_on_model_save": True,
            "contiguous_gradients": True,
            "overlap_comm": False,
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def init_deepspeed_distributed(worker: Worker) -> None:
    """DeepSpeed on the process group Ray Train set up (gloo on CPU, nccl on GPU); a world of one otherwise."""
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        os.environ.update({"RANK": str(worker.rank), "WORLD_SIZE": str(worker.world_size), "LOCAL_RANK": "0"})
    backend = "nccl" if worker.device.type == "cuda" else "gloo"
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)


class Zero3Offload:
    """DeepSpeed ZeRO-3 engine in every worker: base sharded across workers, shards and optimizer on CPU."""

    def __init__(self, config: ExperimentConfig, worker: Worker):
        self.config, self.worker = config, worker
        self.spec: Zero3OffloadStrategy = config.strategy  # type: ignore[assignment]
        self.precision = zero3_precision(self.spec, worker.device)
        if self.precision == "fp16" and worker.rank == 0:
            log.warning("ZeRO-3 with fp16: overflowing steps are skipped; watch the skipped_steps metric")

    def load_base(self) -> nn.Module:
        """The full base, read once per worker (4-bit if asked); deepspeed.initialize then partitions it and keeps
        only this worker's shard (offloaded to CPU), freeing the rest."""
        if self.spec.load_in_4bit is not None:
            return load_quantized_base(self.config, self.spec.load_in_4bit, self.worker.device,
                                       dtype=ZERO3_DTYPES[self.precision])
        return adapters.load_base_model(self.config.model, self.config.data)

    def load_model(self) -> nn.Module:
        # DeepSpeed JIT-builds shm_comm here and cpu_adam in wrap(), each under a file lock that a
        # killed build leaves behind: clear stale ones, bound the wait on live ones
        oplocks.clear_build_locks()
        init_deepspeed_distributed(self.worker)
        return adapters.attach_lora(self.load_base(), self.config.lora, self.config.data)

    def wrap(self, model: nn.Module) -> tuple[nn.Module, torch.optim.Optimizer]:
        import deepspeed

        if self.spec.offload_optimizer:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            oplocks.clear_build_locks()
            optimizer = adapter_optimizer(model, self.config, DeepSpeedCPUAdam, adamw_mode=True)
        else:
            optimizer = adapter_optimizer(model, self.config, torch.optim.AdamW)
        ds_config = deepspeed_config(self.config, self.worker.world_size, self.precision)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=ds_config, dist_init_required=False
        )
        self.model = model
        # the LR schedule drives the wrapped optimizer's param groups (the engine steps it)
        return self.engine, optimizer

    def backward(self, loss: torch.Tensor) -> None:
        # the loop already divided by grad_accum; the engine counts micro-steps itself and
        # steps the optimizer only at accumulation boundaries, so it must see every one
        self.engine.backward(loss, scale_wrt_gas=False)
        self.engine.step()

    def step(self) -> float | None:
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def optimizer_state(self) -> dict[str, Any]:
        state = dict(self.optimizer.state_dict())
        state.pop("loss_scaler", None)  # an object; rebuilt from the config on load
        return state

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        state = dict(state, loss_scaler=self.optimizer.loss_scaler)
        # ZeRO takes one state per rank and picks its own by rank
        self.optimizer.load_state_dict([state] * self.worker.world_size)

    def save_adapter(self, adapter_dir: Path, metadata: dict[str, Any]) -> None:
        import deepspeed

        trainable = [p for p in self.model.parameters() if p.requires_grad]
        # every rank joins the all-gather; inside it rank 0 sees whole tensors, never the [0]-shaped shards
        with deepspeed.zero.GatheredParameters(trainable, modifier_rank=None):
            if self.worker.rank == 0:
                adapters.save_adapter(self.model, adapter_dir, metadata)

    def step_metrics(self) -> dict[str, float]:
        return {"skipped_steps": float(self.engine.skipped_steps)}


def strategy_for(config: ExperimentConfig, worker: Worker) -> MemoryStrategy:
    """The one place that looks at `strategy.kind`."""
    match config.strategy:
        case LoraStrategy():
            return PlainLora(config, worker)
        case QloraStrategy():
            return Qlora(config, worker)
        case Zero3OffloadStrategy():
            return Zero3Offload(config, worker)
    raise TypeError(f"unknown strategy {config.strategy!r}")
