"""The evaluation stage's outputs: terminal table, markdown report with plots, MLflow evaluation run."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from pipeline import report as sweep_report
from pipeline import tracking
from pipeline.config import ExperimentConfig

ROLES = ("base", "candidate", "champion")


def metric_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (suite, metric): each model's value and the candidate's change over the base."""
    rows = []
    for suite_name, per_model in results["suites"].items():
        metrics = list(dict.fromkeys(m for values in per_model.values() for m in values))
        for metric in metrics:
            row: dict[str, Any] = {"suite": suite_name, "metric": metric}
            for role in ROLES:
                if role in per_model:
                    row[role] = per_model[role].get(metric)
            if row.get("candidate") is not None and row.get("base") is not None:
                row["candidate - base"] = row["candidate"] - row["base"]
            rows.append(row)
    return rows


def trial_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per trial: its sampled params, then `<suite>.<metric>` columns."""
    rows = []
    for trial, info in sorted(results.get("trials", {}).items()):
        row: dict[str, Any] = {"trial": trial + (" (candidate)" if info.get("same_as") else "")}
        row.update({k: v for k, v in info.get("params", {}).items()})
        for suite_name, metrics in info["suites"].items():
            row.update({f"{suite_name}.{m}": v for m, v in metrics.items() if m not in ("tokens", "examples")})
        rows.append(row)
    return rows


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def print_table(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    rows = metric_rows(results)
    columns = ["suite", "metric", *[r for r in ROLES if any(r in row for row in rows)], "candidate - base"]
    table = Table(title=f"evaluation of {results['model_ref']}")
    for column in columns:
        table.add_column(column, justify="left" if column in ("suite", "metric") else "right")
    for row in rows:
        table.add_row(*(_fmt(row.get(c)) for c in columns))
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    console.print(table)
    trials = trial_rows(results)
    if trials:
        keys = list(dict.fromkeys(k for r in trials for k in r))
        trial_table = Table(title="every trial's adapter")
        for key in keys:
            trial_table.add_column(key, justify="left" if key == "trial" else "right")
        for row in trials:
            trial_table.add_row(*(_fmt(row.get(k)) for k in keys))
        console.print(trial_table)
    for suite_name, why in results.get("failed", {}).items():
        console.print(f"suite {suite_name} FAILED: {why}", markup=False, highlight=False)


def metrics_png(suite_name: str, per_model: dict[str, dict[str, float]], path: Path) -> Path:
    """Grouped bars: one group per metric, one bar per model."""
    plt = sweep_report._plt()
    metrics = [m for m in dict.fromkeys(k for v in per_model.values() for k in v) if m not in ("tokens", "examples")]
    roles = [r for r in ROLES if r in per_model]
    fig, axes = plt.subplots(1, len(metrics), figsize=(2.2 * len(metrics) + 1, 3.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        values = [per_model[r].get(metric, 0.0) for r in roles]
        ax.bar(roles, values, color=["#999999", "#1f77b4", "#ff7f0e"][:len(roles)])
        ax.set_title(metric, fontsize=9)
        ax.tick_params(labelsize=8)
    fig.suptitle(f"{suite_name}: metrics per model", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def scores_png(suite_name: str, items: list[dict[str, Any]], path: Path) -> Path | None:
    """Per-item score distributions, one histogram per model."""
    by_role = {r: [it["score"] for it in items if it["model"] == r and isinstance(it.get("score"), (int, float))]
               for r in ROLES}
    by_role = {r: s for r, s in by_role.items() if s}
    if not by_role:
        return None
    plt = sweep_report._plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    for role, scores in by_role.items():
        ax.hist(scores, bins=20, alpha=0.5, label=f"{role} (n={len(scores)})")
    ax.set_xlabel("per-item score")
    ax.set_ylabel("items")
    ax.set_title(f"{suite_name}: per-item scores", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown(results: dict[str, Any], pictures: list[str]) -> str:
    rows = metric_rows(results)
    lines = [f"# Evaluation of `{results['model_ref']}`", ""]
    if results["model_version"]:
        lines += [f"Model version {results['model_version']}.", ""]
    if rows:
        keys = list(dict.fromkeys(k for r in rows for k in r))
        lines += [sweep_report.markdown_table([{k: _fmt(r.get(k)) for k in keys} for r in rows]), ""]
    trials = trial_rows(results)
    if trials:
        keys = list(dict.fromkeys(k for r in trials for k in r))
        lines += ["## Every trial's adapter (the one its MLflow run logged)", "",
                  sweep_report.markdown_table([{k: _fmt(r.get(k)) for k in keys} for r in trials]), ""]
    for suite_name, why in results.get("failed", {}).items():
        lines += [f"**Suite {suite_name} failed:** {why}", ""]
    return "\n".join(lines + pictures) + "\n"


def write_report(results: dict[str, Any], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    pictures = []
    for suite_name, per_model in results["suites"].items():
        metrics_png(suite_name, per_model, out / f"metrics_{suite_name}.png")
        pictures.append(f"![{suite_name} metrics](metrics_{suite_name}.png)")
        items = [it for it in results["items"] if it["suite"] == suite_name]
        if scores_png(suite_name, items, out / f"scores_{suite_name}.png"):
            pictures.append(f"![{suite_name} per-item scores](scores_{suite_name}.png)")
    (out / "eval_report.md").write_text(markdown(results, pictures))
    return out


def log_results(config: ExperimentConfig, results: dict[str, Any], reports_dir: Path | None) -> str:
    """An MLflow evaluation run with the metrics, per-item tables and the report; tags on the model version."""
    from mlflow.entities import Metric

    uri = config.tracking.tracking_uri
    mlflow_client = tracking.client(uri)
    experiment_id = tracking.ensure_experiment(mlflow_client, config.tracking.experiment_name, uri)
    ref = results["model_ref"]
    # the version's own registered model (--model may name another than the config's)
    name = ref.removeprefix("models:/").split("/")[0] if ref.startswith("models:/") else config.tracking.registered_model_name
    version = results["model_version"]
    run = mlflow_client.create_run(experiment_id, run_name=f"eval-{name}-v{version}" if version else "eval", tags={
        "loraforge.eval.model_ref": results["model_ref"],
        "loraforge.eval.model_version": str(version),
        "loraforge.eval.registered_model": name,
        "loraforge.eval.suites": ",".join(results["suites"]),
        **({"loraforge.eval.failed": ",".join(results["failed"])} if results["failed"] else {}),
    })
    run_id = run.info.run_id
    now = 0
    metrics = [Metric(f"{role}_{suite_name}_{metric}", float(value), now, 0)
               for suite_name, per_model in results["suites"].items()
               for role, values in per_model.items() for metric, value in values.items()]
    for trial, info in results.get("trials", {}).items():
        metrics += [Metric(f"trial_{trial}_{suite_name}_{metric}", float(value), now, 0)
                    for suite_name, values in info["suites"].items() for metric, value in values.items()]
    for start in range(0, len(metrics), 900):  # MLflow takes at most 1000 metrics a batch
        mlflow_client.log_batch(run_id, metrics=metrics[start:start + 900])
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
        items_dir = out / "items"
        items_dir.mkdir()
        for suite_name in results["suites"]:
            with (items_dir / f"{suite_name}.jsonl").open("w") as f:
                for item in results["items"]:
                    if item["suite"] == suite_name:
                        f.write(json.dumps(item, default=str) + "\n")
        for role, harness in results.get("harness", {}).items():
            (out / f"lm_eval_results_{role}.json").write_text(json.dumps(harness, indent=1, default=str))
        write_report(results, out / "report")
        mlflow_client.log_artifacts(run_id, str(out))
        if reports_dir is not None:
            reports_dir.mkdir(parents=True, exist_ok=True)
            for item in (out / "report").iterdir():
                (reports_dir / item.name).write_bytes(item.read_bytes())
    if version is not None:
        for suite_name, per_model in results["suites"].items():
            for metric, value in per_model.get("candidate", {}).items():
                mlflow_client.set_model_version_tag(name, version, f"eval.{suite_name}.{metric}", f"{value:.6f}")
        mlflow_client.set_model_version_tag(name, version, "loraforge.eval_run_id", run_id)
    mlflow_client.set_terminated(run_id, status="FAILED" if results["failed"] else "FINISHED")
    return run_id
