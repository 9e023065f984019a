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
    resume: Annotated[bool, typer.Option("--resume", help="Continue the newest interrupted sweep of this experiment: "
                                         "finished trials kept, the others continued from their checkpoints.")] = False,
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
        result = run_pipeline(config, reports_dir=reports_dir, resume=resume)
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


@app.command()
def export(
    config_path: Annotated[Path, typer.Argument(metavar="CONFIG", help="The experiment YAML the adapter came from.")],
    out: Annotated[Path, typer.Option(help="Folder for the merged model (safetensors + tokenizer).")],
    adapter: Annotated[Optional[Path], typer.Option(help="A PEFT adapter folder (default: the registry).")] = None,
    model_uri: Annotated[Optional[str], typer.Option(help="models:/<name>@<alias> (default: the config's name and alias).")] = None,
) -> None:
    """Merge an adapter into a full-precision copy of its base (dequantized NF4 for QLoRA) and save it."""
    from pipeline.config import ConfigError, load_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(config_path)
    except ConfigError as err:
        fail_config(err)
    from pipeline import export as exporting

    if adapter is not None:
        if not (adapter / "adapter_config.json").is_file():
            fail_config(ConfigError([f"--adapter: {adapter} is not a PEFT adapter folder (no adapter_config.json)"]))
        report = exporting.merge(adapter, config, out)
    else:
        report = exporting.merge_registered(config, model_uri, out)
    typer.echo(f"merged model written to {report.out_dir}: {report.parameters} parameters; merged vs unmerged "
               f"outputs on {report.examples} eval rows differ by at most {report.max_abs_diff:.3g}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
