"""Ctrl-C and SIGTERM end a run as interrupted: never taken for a finished sweep.

Ray Tune's own SIGINT handler stops the sweep gracefully and `Tuner.fit` then returns as if the
sweep had ended, so the best-so-far would be registered and evaluated. Instead, while a run is
on (`catching`), SIGINT and SIGTERM (`loraforge jobs stop`, Kubernetes) are caught here:

- during the sweep, the signal is recorded and handed to Tune's graceful stop (its SIGUSR1
  handler: trials are stopped at once and the experiment state saved for `--resume`); the
  sweep then raises `Interrupted` instead of returning;
- anywhere else (preflight, registration, evaluation), `Interrupted` is raised at once.

The caller marks the MLflow runs KILLED, registers and evaluates nothing, prints the `--resume`
command and exits 128 + the signal number (130 for SIGINT, 143 for SIGTERM).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """A run stopped by a signal. BaseException, like KeyboardInterrupt: no `except Exception` swallows it."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class _State:
    active = False
    in_sweep = False
    received: int | None = None


_state = _State()


def _handler(signum: int, frame: Any) -> None:
    first = _state.received is None
    _state.received = _state.received or signum
    if _state.in_sweep and first:
        tune_stop = signal.getsignal(signal.SIGUSR1)  # Tune's graceful stop, registered by tune.run
        if callable(tune_stop):
            tune_stop(signal.SIGUSR1, frame)
            return
    raise Interrupted(_state.received)


@contextlib.contextmanager
def catching() -> Iterator[None]:
    """SIGINT and SIGTERM become `Interrupted` while the block runs (main thread only; a no-op elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    _state.received, _state.in_sweep, _state.active = None, False, True
    for s in SIGNALS:
        signal.signal(s, _handler)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        _state.received, _state.in_sweep, _state.active = None, False, False


def reclaim() -> None:
    """Install the handlers again: `ray.init` puts Ray's own failure handler on SIGTERM (it aborts the process)."""
    if _state.active and threading.current_thread() is threading.main_thread():
        for s in SIGNALS:
            signal.signal(s, _handler)


@contextlib.contextmanager
def sweep_phase() -> Iterator[None]:
    """Around `Tuner.fit`: a signal stops Tune gracefully; `Interrupted` is raised once it has returned."""
    _state.in_sweep = True
    try:
        yield
    finally:
        _state.in_sweep = False
    raise_if_received()


def received() -> int | None:
    return _state.received


def raise_if_received() -> None:
    if _state.received is not None:
        raise Interrupted(_state.received)
