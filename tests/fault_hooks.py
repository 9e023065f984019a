"""Fault injection that must happen inside Ray worker processes (Ray's `worker_process_setup_hook`).

`LORAFORGE_TEST_NAN_AT=k:r` makes rank r's k-th training forward return a NaN loss,
the way fault F16 specifies ("multiply the loss by NaN at step k on one rank").
`LORAFORGE_TEST_ENOSPC_FLAG=path` (F17 where a tmpfs cannot be mounted): once `path` exists, writing
a checkpoint's train state writes a few bytes and fails with ENOSPC, as a full disk does mid-file.
Only tests set them; the product has no fault switches.
"""

from __future__ import annotations

import os


def install() -> None:
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
