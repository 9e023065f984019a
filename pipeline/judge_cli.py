"""`loraforge judge`: the LLM judge on its own, apart from a sweep (calibration against labelled judgments)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.cli_common import fail_config

judge_app = typer.Typer(no_args_is_help=True, help="The LLM judge: how well it agrees with labelled judgments.")


@judge_app.command("calibrate")
def calibrate(
    config_path: Annotated[Path, typer.Argument(metavar="CONFIG", help="Experiment YAML: its judge: section is the judge.")],
    labels: Annotated[Path, typer.Option("--labels", help="FastChat single-answer judgment file (JSONL): user_prompt, "
                                         "judge (judge name, prompt name), score (-1: no label).")],
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="Only the first N rows.")] = None,
    overrides: Annotated[Optional[list[str]], typer.Argument(metavar="[KEY=VALUE]...", help="Config overrides.")] = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Also write the report, plot and items here.")] = None,
) -> None:
    """Run the configured judge over labelled judgments; report its agreement with the labels, with intervals."""
    from rich.console import Console
    from rich.table import Table
    from tqdm import tqdm

    from pipeline.config import ConfigError, load_config
    from pipeline.eval.judge import calibrate as calibration
    from pipeline.eval.judge import inputs
    from pipeline.eval.judge import stage as judge_stage

    try:
        config = load_config(config_path, overrides or [])
        judge_prompts = inputs.load_judge_prompts(config.judge)
        rows = calibration.load_labels(labels, judge_prompts, limit)  # a bad file exits 2 before the judge starts
        with judge_stage.session(config) as judge:
            with tqdm(total=sum(r.score is not None for r in rows), desc="judge calibrate", unit="judgment") as bar:
                result = calibration.calibrate(config, labels, limit, bar, judge)
    except (ConfigError, inputs.InputError) as err:
        fail_config(err)
    calibration.log_run(config, result, out_dir)
    table = Table(title=f"judge {result.judge['name']} vs {labels.name}: {result.counts['rated']} of "
                        f"{result.counts['labelled']} rated ({result.counts['unparseable']} unparseable, "
                        f"{result.counts['failed']} failed)")
    for column in ("metric", "value", "95% interval"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for row in calibration.table_rows(result):
        table.add_row(*row.values())
    Console(width=120).print(table)
    typer.echo(f"MLflow run {result.run_id} ({config.tracking.experiment_name}); {result.seconds:.1f} s")
