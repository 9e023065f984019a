"""What every `loraforge` command shares: logging and the exit-2 error for bad input."""

from __future__ import annotations

import logging

import typer

from pipeline import redact

EXIT_CONFIG = 2


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpx2", "openai"):  # one line per judge request otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    redact.install_log_filter()


def fail_config(error: Exception | str) -> None:
    """Print a config or input problem without a traceback and exit 2."""
    from rich.console import Console

    Console(stderr=True, soft_wrap=True).print(f"error: {redact.redact_text(str(error))}", highlight=False, markup=False)
    raise typer.Exit(EXIT_CONFIG)
