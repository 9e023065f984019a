"""The `loraforge` command."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="LoRA / QLoRA sweeps on Ray, tracked in MLflow.")

EXIT_CONFIG = 2


@app.callback()
def main() -> None:
    """loraforge: sweep -> train -> track -> register -> evaluate."""


def fail_config(error: Exception) -> None:
    """Print a config problem without a traceback and exit 2."""
    from rich.console import Console

    Console(stderr=True, soft_wrap=True).print(f"error: {error}", highlight=False, markup=False)
    raise typer.Exit(EXIT_CONFIG)


@app.command()
def run(
    config_path: Annotated[Path, typer.Argument(metavar="CONFIG", help="Experiment YAML, e.g. configs/quickstart.yaml.")],
    overrides: Annotated[Optional[list[str]], typer.Argument(metavar="[KEY.SUB=VALUE]...", help="Config overrides.")] = None,
    reports_dir: Annotated[Optional[Path], typer.Option(help="Also write report.md and plots here.")] = Path("reports"),
) -> None:
    """Run the sweep in CONFIG end to end and register its winner."""
    from pipeline.config import ConfigError, load_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(config_path, overrides or [])
    except ConfigError as err:
        fail_config(err)
    from pipeline.run import run_pipeline
    from pipeline.sweep import SweepError

    try:
        result = run_pipeline(config, reports_dir=reports_dir)
    except ConfigError as err:
        fail_config(err)
    except SweepError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1)
    metric = config.sweep.metric.removeprefix("eval_")
    value = result.eval_metrics.get(f"eval_{metric}")
    typer.echo(f"registered: {result.model_uri} (version {result.model_version}); "
               f"eval {metric} loaded back from the registry: {value:.4f}" if value is not None else
               f"registered: {result.model_uri} (version {result.model_version})")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
