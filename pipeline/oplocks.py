"""DeepSpeed's JIT-built ops (cpu_adam, shm_comm) without the unbounded wait on a dead build's lock.

torch builds an extension under `<TORCH_EXTENSIONS_DIR>/<name>/lock`, a file created with O_EXCL
and held open by the building process until it removes it. A build killed mid-way (Ctrl-C, a
timeout, `ray stop`) leaves the file, and every later load waits on it in `FileBaton.wait`
forever, silently. `clear_build_locks()` runs before every ZeRO-3 load: a lock no process on this
machine holds open is stale and removed (with a warning naming it); a lock a live process holds
is waited on for at most LORAFORGE_OP_BUILD_WAIT_S seconds, then an error names the file and the
holder. `python -m pipeline.oplocks` builds the ops at install time (`make venv`, the images), so
a run rarely builds at all.

Holders are found through /proc (Linux); where there is no /proc, or the extension folder is
shared between machines, a lock is only ever waited on, within the same bound.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)

WAIT_ENV = "LORAFORGE_OP_BUILD_WAIT_S"
DEFAULT_WAIT_S = 900.0  # a cold cpu_adam build takes about a minute on 2 cores
ZERO3_OPS = ("CPUAdamBuilder", "ShareMemCommBuilder")


class OpBuildLockHeld(RuntimeError):
    """A live process has held an op's build lock past the bound."""


def extensions_root() -> Path:
    """The folder torch builds JIT extensions in (TORCH_EXTENSIONS_DIR or its default)."""
    from torch.utils.cpp_extension import _get_build_directory

    # torch names (and creates) one op's folder; cpu_adam's is made by its first build anyway
    return Path(_get_build_directory("cpu_adam", verbose=False)).parent


def holders(lock: Path) -> list[int] | None:
    """Pids of local processes holding `lock` open; None where that cannot be known."""
    proc = Path("/proc")
    if not (proc / "self" / "fd").is_dir():
        return None
    target = os.path.realpath(lock)
    found = []
    for pid_dir in proc.iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            fds = list((pid_dir / "fd").iterdir())
        except OSError:  # gone, or not ours to read
            continue
        for fd in fds:
            try:
                if os.readlink(fd) == target:
                    found.append(int(pid_dir.name))
                    break
            except OSError:
                continue
    return found


def _command(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()[:160] or "?"


def _stale(lock: Path) -> bool:
    """No process holds it, checked twice a moment apart (a release closes, then removes)."""
    if holders(lock) != []:
        return False
    try:
        before = lock.stat()
    except FileNotFoundError:
        return False
    time.sleep(0.2)
    try:
        after = lock.stat()
    except FileNotFoundError:
        return False
    return (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns) and holders(lock) == []


def wait_bound() -> float:
    raw = os.environ.get(WAIT_ENV, "")
    try:
        return float(raw) if raw.strip() else DEFAULT_WAIT_S
    except ValueError:
        raise ValueError(f"{WAIT_ENV}={raw!r} is not a number of seconds; set it to e.g. 900") from None


def clear_build_locks(root: Path | None = None, bound_s: float | None = None, poll_s: float = 1.0) -> None:
    """Remove stale build locks under the extension root; wait a bounded time for held ones."""
    root = extensions_root() if root is None else root
    bound_s = wait_bound() if bound_s is None else bound_s
    start = time.monotonic()
    warned: set[Path] = set()
    while True:
        locks = sorted(root.glob("*/lock")) if root.is_dir() else []
        held = []
        for lock in locks:
            if _stale(lock):
                try:
                    lock.unlink()
                    log.warning("removed a stale op build lock no process holds: %s "
                                "(a build was killed mid-way; the op is rebuilt)", lock)
                except FileNotFoundError:
                    pass
            elif lock.exists():
                held.append(lock)
        if not held:
            return
        waited = time.monotonic() - start
        if waited >= bound_s:
            lock = held[0]
            pids = holders(lock)
            who = ", ".join(f"pid {p} ({_command(p)})" for p in pids) if pids else "a process this machine cannot see"
            raise OpBuildLockHeld(
                f"the op build lock {lock} has been held for {waited:.0f} s by {who}; wait for that build, "
                f"stop that process, or, if no build is running, delete the lock. "
                f"{WAIT_ENV} sets this bound ({bound_s:.0f} s now)")
        for lock in held:
            if lock not in warned:
                warned.add(lock)
                log.warning("waiting (at most %.0f s) for an op build in progress: %s", bound_s, lock)
        time.sleep(poll_s)


def build_zero3_ops() -> None:
    """JIT-build (or load from cache) the ops ZeRO-3 with CPU offload uses, under the lock guard."""
    from deepspeed.accelerator import get_accelerator

    clear_build_locks()
    for name in ZERO3_OPS:
        builder = get_accelerator().create_op_builder(name)
        if builder is not None and builder.is_compatible(verbose=False):
            builder.load(verbose=False)
            print(f"ready: {builder.name}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    build_zero3_ops()
