"""The `loraforge` command."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline import jobs_cli, judge_cli
from pipeline.cli_common import EXIT_CONFIG, fail_config, setup_logging  # noqa: F401 (EXIT_CONFIG: for callers)

app = typer.Typer(add_completion=False, no_args_is_help=True, help="LoRA / QLoRA sweeps on Ray, tracked in MLflow.")


@app.callback()
def main() -> None:
    """loraforge: sweep -> train -> track -> register -> evaluate."""


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

    setup_logging()
    try:
        config = load_config(config_path, overrides or [])
    except ConfigError as err:
        fail_config(err)
    from pipeline.interrupts import Interrupted
    from pipeline.run import run_pipeline, signal_name
    from pipeline.sweep import SweepError

    try:
        result = run_pipeline(config, reports_dir=reports_dir, resume=resume)
    except ConfigError as err:
        fail_config(err)
    except SweepError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1)
    except Interrupted as err:
        import shlex

        from pipeline import redact

        again = redact.redact_text(shlex.join(["loraforge", "run", str(config_path), *(overrides or []), "--resume"]))
        typer.echo(f"interrupted by {signal_name(err.signum)}: nothing was registered or evaluated; the MLflow runs are "
                   f"marked KILLED and the trials' checkpoints kept. Continue the sweep with:\n  {again}", err=True)
        raise typer.Exit(err.exit_code)
    metric = config.sweep.metric.removeprefix("eval_")
    value = result.eval_metrics.get(f"eval_{metric}")
    typer.echo(f"registered: {result.model_uri} (version {result.model_version}); "
               f"eval {metric} loaded back from the registry: {value:.4f}" if value is not None else
               f"registered: {result.model_uri} (version {result.model_version})")
    failed = result.evaluation.failed if result.evaluation is not None else {}
    if failed:
        from pipeline.eval.report import failure_label

        typer.echo(f"error: evaluation failed: {', '.join(f'{failure_label(k)} ({v})' for k, v in failed.items())}; "
                   "the adapter is registered and the other suites' results were kept", err=True)
        raise typer.Exit(1)


app.command("submit")(jobs_cli.submit)
app.add_typer(jobs_cli.jobs_app, name="jobs")
app.add_typer(judge_cli.judge_app, name="judge")


@app.command()
def export(
    config_path: Annotated[Path, typer.Argument(metavar="CONFIG", help="The experiment YAML the adapter came from.")],
    out: Annotated[Path, typer.Option(help="Folder for the merged model (safetensors + tokenizer).")],
    adapter: Annotated[Optional[Path], typer.Option(help="A PEFT adapter folder (default: the registry).")] = None,
    model_uri: Annotated[Optional[str], typer.Option(help="models:/<name>@<alias> or models:/<name>/<version> (default: the config's name and alias).")] = None,
) -> None:
    """Merge an adapter into a full-precision copy of its base (dequantized NF4 for QLoRA) and save it."""
    from pipeline.config import ConfigError, load_config

    setup_logging()
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
        try:
            report = exporting.merge_registered(config, model_uri, out)
        except ConfigError as err:
            fail_config(err)
    typer.echo(f"merged model written to {report.out_dir}: {report.parameters} parameters; merged vs unmerged "
               f"outputs on {report.examples} eval rows differ by at most {report.max_abs_diff:.3g}")


@app.command("eval")
def eval_command(
    config_path: Annotated[Path, typer.Argument(metavar="CONFIG", help="The experiment YAML the adapter came from.")],
    overrides: Annotated[Optional[list[str]], typer.Argument(metavar="[KEY.SUB=VALUE]...", help="Config overrides.")] = None,
    model: Annotated[Optional[str], typer.Option("--model", help="Adapter: models:/name@alias, models:/name/N, runs:/ID/adapter "
                                                 "or a folder (default: the config's registered alias).")] = None,
    suite: Annotated[Optional[list[str]], typer.Option("--suite", help="A suite to run (repeatable); replaces eval.suites.")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the results as one JSON file "
                                                     "(schema: pipeline/eval/results.schema.json).")] = None,
    reports_dir: Annotated[Optional[Path], typer.Option(help="Also write eval_report.md and plots here.")] = Path("reports"),
) -> None:
    """Score an adapter, the base model without it and the champion with the benchmark suites."""
    from pipeline.config import ConfigError, load_config

    setup_logging()
    try:
        config = load_config(config_path, overrides or [])
        from pipeline import preflight
        from pipeline.cluster import set_env_defaults

        set_env_defaults()
        problems = preflight.check_model(config) + preflight.check_data_files(config)
        if problems:
            raise ConfigError(problems)
        from pipeline.eval import stage

        result = stage.run_stage(config, model_ref=model, suite_list=suite, json_out=json_out, reports_dir=reports_dir)
    except ConfigError as err:
        fail_config(err)
    if json_out is not None:
        typer.echo(f"results written to {json_out}")
    if result.failed:
        from pipeline.eval.report import failure_label

        typer.echo(f"error: failed: {', '.join(f'{failure_label(k)} ({v})' for k, v in result.failed.items())}; "
                   "the others' results were kept", err=True)
        raise typer.Exit(1)


@app.command()
def similarity(
    first: Annotated[str, typer.Argument(help="Adapter: folder, models:/name/version, models:/name@alias or runs:/id/adapter.")],
    second: Annotated[str, typer.Argument(help="The adapter to compare with (same base model).")],
    module: Annotated[Optional[str], typer.Option(help="Only modules whose name contains this, e.g. 'layer.5.attention.self.query'.")] = None,
    tracking_uri: Annotated[str, typer.Option(envvar="MLFLOW_TRACKING_URI", help="MLflow store for URIs.")] = "sqlite:///mlruns.db",
    out: Annotated[Path, typer.Option(help="Heatmap PNG of phi(i, j) for the deepest matching module.")] = Path("subspace_similarity.png"),
) -> None:
    """Normalized subspace similarity phi(A1, A2, i, j) between two adapters' A matrices (LoRA paper, section 7.2)."""
    import tempfile

    from pipeline import analysis, tracking
    from pipeline.config import ConfigError

    with tempfile.TemporaryDirectory() as tmp:
        try:
            dirs = [tracking.fetch_adapter(ref, tracking_uri, Path(tmp) / str(i)) for i, ref in enumerate((first, second))]
            phis = analysis.compare_adapters(dirs[0], dirs[1], module)
        except Exception as err:  # a bad reference or mismatched adapters: say which, exit 2
            fail_config(ConfigError([f"similarity: {err}"]))
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"phi(A1, A2, i, j): {first} vs {second}")
    for column in ("module", "r1 x r2", "phi(1,1)", "mean phi(i, i)", "phi(r1, r2)"):
        table.add_column(column, justify="left" if column == "module" else "right")
    for name, phi in phis.items():
        k = min(phi.shape)
        table.add_row(name.removeprefix("base_model.model."), f"{phi.shape[0]} x {phi.shape[1]}", f"{phi[0, 0]:.3f}",
                      f"{sum(phi[i, i] for i in range(k)) / k:.3f}", f"{phi[-1, -1]:.3f}")
    Console(width=160).print(table)
    name, phi = list(phis.items())[-1]
    analysis.similarity_png(phi, f"{name.removeprefix('base_model.model.')}", (first, second), out)
    typer.echo(f"heatmap of {name.removeprefix('base_model.model.')} written to {out}")


@app.command()
def promote(
    config_path: Annotated[Path, typer.Argument(metavar="CONFIG", help="The experiment YAML (tracking URI, registered "
                                                "model and registry.promotion.gate).")],
    from_alias: Annotated[Optional[str], typer.Option("--from", help="Alias to promote (default: registry.promotion.from_alias).")] = None,
    to_alias: Annotated[Optional[str], typer.Option("--to", help="Alias to move (default: registry.promotion.to_alias).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Promote even if the gate fails (needs --reason).")] = False,
    reason: Annotated[Optional[str], typer.Option("--reason", help="Why: recorded with --force or --rollback.")] = None,
    rollback: Annotated[bool, typer.Option("--rollback", help="Point the alias back at the champion before.")] = False,
) -> None:
    """Move `champion` to the candidate when it passes the eval gate; exit 1 when it does not."""
    from pipeline.config import ConfigError, load_config

    setup_logging()
    try:
        config = load_config(config_path)
        promotion = config.registry.promotion.model_copy(update={
            k: v for k, v in (("from_alias", from_alias), ("to_alias", to_alias)) if v is not None})
        config = config.model_copy(update={"registry": config.registry.model_copy(update={"promotion": promotion})})
        from pipeline.registry import promotion as promoting
        from pipeline.cluster import set_env_defaults

        set_env_defaults()
        if rollback:
            decision = promoting.rollback(config, reason)
        else:
            decision = promoting.promote(config, force=force, reason=reason)
    except ConfigError as err:
        fail_config(err)
    promoting.print_decision(decision, promotion.to_alias)
    if not decision.promoted:
        raise typer.Exit(1)


TrackingOption = Annotated[str, typer.Option(envvar="MLFLOW_TRACKING_URI", help="MLflow tracking URI.")]


@app.command()
def models(
    name: Annotated[Optional[str], typer.Argument(help="A registered model (default: all).")] = None,
    tracking_uri: TrackingOption = "sqlite:///mlruns.db",
) -> None:
    """Registered versions: aliases, eval metrics, base, LoRA settings, promotion and created time."""
    from pipeline import redact
    from pipeline.registry import tables

    try:
        rows = tables.model_rows(tracking_uri, name)
    except Exception as err:  # no such model, an unreachable store: say which
        fail_config(f"models: {err.__class__.__name__}: {redact.redact_text(str(err))}")
    tables.print_rows(rows, tables.title("registered models", tracking_uri))


@app.command()
def runs(
    experiment: Annotated[Optional[str], typer.Argument(help="An experiment (default: all).")] = None,
    tracking_uri: TrackingOption = "sqlite:///mlruns.db",
) -> None:
    """Sweeps: trials, best metric, status, registered version and start time."""
    from pipeline import redact
    from pipeline.registry import tables

    try:
        rows = tables.run_rows(tracking_uri, experiment)
    except Exception as err:
        fail_config(f"runs: {err.__class__.__name__}: {redact.redact_text(str(err))}")
    tables.print_rows(rows, tables.title("sweeps", tracking_uri))


mlflow_app = typer.Typer(no_args_is_help=True, help="The MLflow side: writes queued while the server was away.")
app.add_typer(mlflow_app, name="mlflow")


@mlflow_app.command("sync")
def mlflow_sync(
    outbox_dir: Annotated[Path, typer.Argument(metavar="OUTBOX_DIR", help="The folder a run printed (default location: "
                                               "<ray.storage_path>/mlflow_outbox).")],
    tracking_uri: Annotated[str, typer.Option(envvar="MLFLOW_TRACKING_URI", help="The MLflow server to send them to.")],
) -> None:
    """Send the metrics, params, tags, artifacts and run states a run queued while the server was unreachable."""
    from pipeline import outbox, redact, tracking

    setup_logging()
    if not outbox_dir.is_dir():
        fail_config(f"OUTBOX_DIR: {outbox_dir} is not a folder")
    box = outbox.Outbox(outbox_dir)
    torn_before = box.torn_total()
    sent, left = box.drain(tracking.raw_client(tracking_uri))
    typer.echo(f"sent {sent} queued writes to {redact.redact_text(tracking_uri)}; {left} left")
    torn = box.torn_total() - torn_before
    if torn:
        typer.echo(f"warning: {torn} queued line(s) were cut short (a process killed mid-write) and could not be "
                   f"sent; they are kept in {outbox_dir / outbox.TORN}", err=True)
    if left:
        typer.echo(f"error: {redact.redact_text(tracking_uri)} is still unreachable; run this again when it is back",
                   err=True)
        raise typer.Exit(1)


data_app = typer.Typer(no_args_is_help=True, help="Third-party datasets and reference files: fetch and check them.")
app.add_typer(data_app, name="data")

RootOption = Annotated[Optional[Path], typer.Option("--root", help="Data root (default: $LORAFORGE_DATA_ROOT, else ./data).")]


@data_app.command("fetch")
def data_fetch(
    names: Annotated[Optional[list[str]], typer.Argument(metavar="[NAME]...", help="Datasets or file paths (default: all).")] = None,
    root: RootOption = None,
    mirror: Annotated[Optional[str], typer.Option(help="Mirror folder or http(s) URL (default: $LORAFORGE_DATA_MIRROR, "
                                                  "else ../shared beside the checkout).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace files that differ from the manifest.")] = False,
) -> None:
    """Fill the data root from a mirror or the public sources; every file is checked against its sha256."""
    from pipeline import datafiles

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        fetched = datafiles.fetch(names or [], root=root, mirror=mirror, force=force, echo=typer.echo)
    except datafiles.DataError as err:
        fail_config(err)
    where = (root or datafiles.data_root()).resolve()
    typer.echo(f"{len(fetched)} files verified under {where}")


@data_app.command("list")
def data_list(root: RootOption = None) -> None:
    """The manifest's files: dataset, license, size, rows, and whether each is present and verified."""
    from rich.console import Console
    from rich.table import Table

    from pipeline import datafiles

    where = (root or datafiles.data_root()).resolve()
    table = Table(title=f"data root {where}")
    for column in ("name", "file", "license", "size", "rows", "status"):
        table.add_column(column, justify="right" if column in ("size", "rows") else "left")
    for item in datafiles.status(where):
        state = {"verified": "present, verified", "missing": "missing",
                 "differs": f"DIFFERS: {item.detail}"}[item.state]
        table.add_row(item.dataset, item.entry.path, item.license, f"{item.entry.size / 2**20:.2f} MiB",
                      str(item.entry.rows), state)
    Console(width=200).print(table)


metrics_app = typer.Typer(no_args_is_help=True, help="Score files in a benchmark's own format, as its official script does.")
app.add_typer(metrics_app, name="metrics")


@metrics_app.command("e2e")
def metrics_e2e(
    references: Annotated[Path, typer.Argument(metavar="REFS", help="References: one a line, a blank line between instances.")],
    hypotheses: Annotated[Path, typer.Argument(metavar="HYP", help="System outputs: one a line, one per instance.")],
) -> None:
    """BLEU, NIST, METEOR, ROUGE_L and CIDEr, as the official E2E NLG metrics script computes them."""
    from pipeline.eval import e2e_metrics

    problems = [f"{name}: file {str(path)!r} not found" for name, path in (("REFS", references), ("HYP", hypotheses))
                if not path.is_file()]
    if problems:
        fail_config("\n".join(problems))
    try:
        refs = e2e_metrics.read_references(references)
    except e2e_metrics.BadReferences as err:
        fail_config(err)
    hyps = e2e_metrics.read_hypotheses(hypotheses)
    if len(refs) != len(hyps):
        fail_config(f"{references} has {len(refs)} instances (blank-line separated) but {hypotheses} "
                    f"has {len(hyps)} lines; give one output per instance")
    try:
        scores = e2e_metrics.score(refs, hyps)
    except e2e_metrics.JavaMissing as err:
        fail_config(err)
    for name in e2e_metrics.METRICS:
        typer.echo(f"{name}: {scores[name]:.4f}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
