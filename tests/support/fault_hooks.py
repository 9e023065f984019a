"""Fault injection that must happen inside Ray worker processes (Ray's `worker_process_setup_hook`).

`LORAFORGE_TEST_NAN_AT=k:r` makes rank r's k-th training forward return a NaN loss,
the way fault F16 specifies ("multiply the loss by NaN at step k on one rank").
`LORAFORGE_TEST_ENOSPC_FLAG=path` (F17 where a tmpfs cannot be mounted): once `path` exists, writing
a checkpoint's train state writes a few bytes and fails with ENOSPC, as a full disk does mid-file.
`LORAFORGE_TEST_FACTS_DIR=path` (not a fault): every Train worker of a QLoRA or ZeRO-3 trial writes what
its model really is once the strategy has wrapped it (4-bit layers and their quant state; ZeRO-3's
partitioned parameters and where the optimizer lives), one JSON file per worker, for tests/test_strategies.py.
Only tests set them; the product has no fault switches.
"""

from __future__ import annotations

import os


def install() -> None:
    if os.environ.get("LORAFORGE_TEST_FACTS_DIR"):
        _record_strategy_facts(os.environ["LORAFORGE_TEST_FACTS_DIR"])
    if os.environ.get("LORAFORGE_TEST_ENOSPC_FLAG"):
        _disk_full_after_flag(os.environ["LORAFORGE_TEST_ENOSPC_FLAG"])
    spec = os.environ.get("LORAFORGE_TEST_NAN_AT")
    if not spec:
        return
    at_call, on_rank = (int(x) for x in spec.split(":"))
    import torch

    from pipeline import strategies

    class NanLossAt(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module):
            super().__init__()
            self.inner = inner
            self.calls = 0

        def forward(self, **batch):
            out = self.inner(**batch)
            if self.training:
                self.calls += 1
                if self.calls == at_call:
                    out["loss"] = out["loss"] * float("nan")
            return out

    original = strategies._DataParallel.wrap

    def wrap(self, model):
        wrapped, optimizer = original(self, model)
        return (NanLossAt(wrapped) if self.worker.rank == on_rank else wrapped), optimizer

    strategies._DataParallel.wrap = wrap


def _disk_full_after_flag(flag: str) -> None:
    import errno
    from pathlib import Path

    from pipeline import checkpoint

    original = checkpoint.save_state

    def save_state(path, state):
        if not Path(flag).exists():
            return original(path, state)
        with open(path, "wb") as f:
            f.write(b"\0" * 4096)
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    checkpoint.save_state = save_state


def _record_strategy_facts(folder: str) -> None:
    import json
    from pathlib import Path

    from pipeline import strategies

    def qlora_facts(model) -> dict:
        import bitsandbytes as bnb

        layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        states = [m.weight.quant_state for m in layers]
        return {"linear4bit": len(layers), "uint8_storage": all(m.weight.dtype.is_floating_point is False for m in layers),
                "quant_types": sorted({s.quant_type for s in states if s is not None}),
                "with_quant_state": sum(s is not None for s in states),
                "double_quant": all(s is not None and s.nested for s in states),
                "lora_layers": sum(hasattr(m, "lora_A") and hasattr(m, "base_layer") for m in model.modules()),
                "lora_on_4bit": sum(hasattr(m, "lora_A") and isinstance(getattr(m, "base_layer", None), bnb.nn.Linear4bit)
                                    for m in model.modules())}

    def zero3_facts(strategy) -> dict:
        engine = strategy.engine
        frozen = [p for p in engine.module.parameters() if not p.requires_grad]
        groups = getattr(engine.optimizer, "fp32_partitioned_groups_flat", [])
        return {"stage": engine.zero_optimization_stage(), "offload_optimizer": bool(engine.zero_offload_optimizer()),
                "base_params": len(frozen),
                "partitioned": sum(hasattr(p, "ds_id") and p.numel() == 0 and p.ds_numel > 0 for p in frozen),
                "base_numel": sum(p.ds_numel for p in frozen if hasattr(p, "ds_numel")),
                "local_numel": sum(p.ds_tensor.numel() for p in frozen if hasattr(p, "ds_tensor")),
                "inner_optimizer": type(getattr(engine.optimizer, "optimizer", None)).__name__,
                "fp32_master_devices": sorted({str(g.device) for g in groups})}

    def record(kind: str, facts: dict, rank: int) -> None:
        out = Path(folder) / f"{kind}-{os.getpid()}-rank{rank}.json"
        out.write_text(json.dumps({"kind": kind, "rank": rank, **facts}))

    qlora_wrap = strategies.Qlora.wrap

    def wrap_qlora(self, model):
        wrapped = qlora_wrap(self, model)
        record("qlora", qlora_facts(model), self.worker.rank)
        return wrapped

    zero3_wrap = strategies.Zero3Offload.wrap

    def wrap_zero3(self, model):
        wrapped = zero3_wrap(self, model)
        record("zero3_offload", zero3_facts(self), self.worker.rank)
        return wrapped

    strategies.Qlora.wrap = wrap_qlora
    strategies.Zero3Offload.wrap = wrap_zero3
