"""The evaluation stage's outputs: terminal table, markdown report with plots, MLflow evaluation run."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from pipeline import atomic, redact, render, tracking
from pipeline.config import ExperimentConfig
from pipeline.eval.judge import fastchat

ROLES = ("base", "candidate", "champion")


def roles_of(per_model: dict[str, Any]) -> list[str]:
    """The models in a suite's results: base, candidate, champion first, then others (side-by-side ref:<name>)."""
    return [r for r in ROLES if r in per_model] + [r for r in per_model if r not in ROLES]


def metric_key(suite_name: str, role: str, metric: str) -> str:
    """MLflow metric name: `<role>_<suite>_<metric>`; the judge's `judge.<mode>.<model>.<metric>`."""
    if suite_name.startswith("judge_"):
        return f"judge.{suite_name.removeprefix('judge_')}.{role.replace(':', '_')}.{metric}"
    return f"{role}_{suite_name}_{metric}"


def metric_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (suite, metric): each model's value and the candidate's change over the base."""
    rows = []
    for suite_name, per_model in results["suites"].items():
        metrics = list(dict.fromkeys(m for values in per_model.values() for m in values))
        for metric in metrics:
            row: dict[str, Any] = {"suite": suite_name, "metric": metric}
            for role in roles_of(per_model):
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
    others = list(dict.fromkeys(k for row in rows for k in row if k not in ("suite", "metric", "candidate - base")))
    columns = ["suite", "metric", *roles_of(dict.fromkeys(others)), "candidate - base"]
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
    if "judge" in results:
        console.print(judge_line(results["judge"]), markup=False, highlight=False)
    for key, why in results.get("failed", {}).items():
        console.print(f"{failure_label(key)} FAILED: {why}", markup=False, highlight=False)


# on a registered version: "passed", or "failed: <reason>" (its adapter changes nothing; promote refuses it)
ADAPTER_CHECK_TAG = "loraforge.adapter_check"


def failure_label(key: str) -> str:
    """How a `failed` entry is named: suites by name, adapter checks by the model they failed."""
    if key == "adapter":
        return "adapter check (candidate)"
    if key.startswith("adapter:"):
        return f"adapter check ({key.removeprefix('adapter:')})"
    return f"suite {key}"


def judge_line(judge: dict[str, Any]) -> str:
    line = (f"judge {judge['name']} ({judge['base_url']}): {judge['requests']} requests ({judge['retries']} retries, "
            f"{judge['failed_requests']} failed), {judge['cached']} from the cache, {judge['prompt_tokens']} prompt + "
            f"{judge['completion_tokens']} completion tokens, ${judge['cost_usd']:.4f}; "
            f"judging took {judge['judge_seconds']:.1f} s")
    calibration = judge.get("calibration")
    if not calibration:
        return line + "; no calibration run of this judge (`loraforge judge calibrate`): its agreement is unmeasured"

    def bounded(name: str) -> str:
        value, low, high = (calibration.get(k) for k in (name, f"{name}_low", f"{name}_high"))
        if value is None:
            return "undefined"
        return f"{value:.3f}" + (f" [{low:.3f}, {high:.3f}]" if low is not None and high is not None else "")

    weighted = f", probability-weighted {bounded('weighted_spearman')}" if calibration.get("weighted_spearman") else ""
    return (line + f"; calibrated against {calibration.get('labelled') or 0:.0f} labels ({calibration['labels']}): Spearman "
            f"{bounded('spearman')}{weighted} (run {calibration['run_id']})")


def metrics_png(suite_name: str, per_model: dict[str, dict[str, float]], path: Path) -> Path:
    """Grouped bars: one group per metric, one bar per model."""
    plt = render.pyplot()
    metrics = [m for m in dict.fromkeys(k for v in per_model.values() for k in v) if m not in ("tokens", "examples")]
    roles = roles_of(per_model)
    fig, axes = plt.subplots(1, len(metrics), figsize=(2.2 * len(metrics) + 1, 3.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        values = [per_model[r].get(metric, 0.0) for r in roles]
        ax.bar(roles, values, color=(["#999999", "#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b"] * 2)[:len(roles)])
        ax.set_title(metric, fontsize=9)
        ax.tick_params(labelsize=8)
    fig.suptitle(f"{suite_name}: metrics per model", fontsize=10)
    return render.save(plt, fig, path)


def scores_png(suite_name: str, items: list[dict[str, Any]], path: Path) -> Path | None:
    """Per-item score distributions, one histogram per model."""
    by_role = {r: [it["score"] for it in items if it["model"] == r and isinstance(it.get("score"), (int, float))]
               for r in roles_of(dict.fromkeys(it["model"] for it in items))}
    by_role = {r: s for r, s in by_role.items() if s}
    if not by_role:
        return None
    plt = render.pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    for role, scores in by_role.items():
        ax.hist(scores, bins=20, alpha=0.5, label=f"{role} (n={len(scores)})")
    ax.set_xlabel("per-item score")
    ax.set_ylabel("items")
    ax.set_title(f"{suite_name}: per-item scores", fontsize=10)
    ax.legend(fontsize=8)
    return render.save(plt, fig, path)


def categories_png(items: list[dict[str, Any]], path: Path) -> Path | None:
    """judge_single: mean score per MT-Bench category, one bar per model."""
    scored = [it for it in items if it["status"] == "scored" and it.get("category")]
    if not scored:
        return None
    categories = sorted({it["category"] for it in scored})
    roles = roles_of(dict.fromkeys(it["model"] for it in scored))
    plt = render.pyplot()
    fig, ax = plt.subplots(figsize=(1.1 * len(categories) * max(1, len(roles)) / 2 + 3, 3.4))
    width = 0.8 / len(roles)
    for i, role in enumerate(roles):
        means = []
        for category in categories:
            chosen = [it["score"] for it in scored if it["model"] == role and it["category"] == category]
            means.append(sum(chosen) / len(chosen) if chosen else 0.0)
        ax.bar([c + i * width for c in range(len(categories))], means, width, label=role)
    ax.set_xticks([c + 0.4 - width / 2 for c in range(len(categories))], categories, fontsize=8)
    ax.set_ylim(0, 10)
    ax.set_ylabel("mean score (scored items)")
    ax.set_title("judge_single: mean score per category", fontsize=10)
    ax.legend(fontsize=8)
    return render.save(plt, fig, path)


def verdicts_png(items: list[dict[str, Any]], path: Path) -> Path | None:
    """judge_pairwise: one stacked bar of win / tie / loss / unparseable / failed pairs."""
    if not items:
        return None
    counts = {"win": 0, "tie": 0, "loss": 0, "unparseable": 0, "failed": 0}
    for it in items:
        counts[it.get("verdict") or it["status"]] += 1
    plt = render.pyplot()
    fig, ax = plt.subplots(figsize=(6, 1.9))
    left = 0
    colors = {"win": "#2ca02c", "tie": "#bbbbbb", "loss": "#d62728", "unparseable": "#ff7f0e", "failed": "#000000"}
    for key, value in counts.items():
        if value:
            ax.barh([0], [value], left=left, color=colors[key], label=f"{key} {value}")
            left += value
    ax.set_yticks([])
    ax.set_xlabel("question-turn pairs (both orders judged)")
    ax.set_title(f"judge_pairwise: candidate vs {items[0]['opponent']}", fontsize=10)
    ax.legend(fontsize=7, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.45))
    return render.save(plt, fig, path)


def markdown(results: dict[str, Any], pictures: list[str]) -> str:
    rows = metric_rows(results)
    lines = [f"# Evaluation of `{results['model_ref']}`", ""]
    if results["model_version"]:
        lines += [f"Model version {results['model_version']}.", ""]
    if rows:
        keys = list(dict.fromkeys(k for r in rows for k in r))
        lines += [render.markdown_table([{k: _fmt(r.get(k)) for k in keys} for r in rows]), ""]
    trials = trial_rows(results)
    if trials:
        keys = list(dict.fromkeys(k for r in trials for k in r))
        lines += ["## Every trial's adapter (the one its MLflow run logged)", "",
                  render.markdown_table([{k: _fmt(r.get(k)) for k in keys} for r in trials]), ""]
    replies = replies_rows(results)
    if replies:
        lines += ["## Replies", "", "Each model's reply in the chat template (`replies`; a held-out conversation's real "
                  "reply beside it).", "", render.markdown_table(replies), ""]
    if "judge" in results:
        lines += ["## The judge", "", judge_line(results["judge"]) + ".", "",
                  "Means are over scored items only; `unparseable` (no valid rating after the re-asks) and `failed` "
                  "(no reply) items are counted, never scored. Per-item judgments: `items/judge_*.jsonl`; "
                  "FastChat files: `fastchat/`.", ""]
    for key, why in results.get("failed", {}).items():
        label = failure_label(key)
        lines += [f"**{label[0].upper()}{label[1:]} failed:** {why}", ""]
    return "\n".join(lines + pictures) + "\n"


def replies_rows(results: dict[str, Any], width: int = 160) -> list[dict[str, str]]:
    """One row per `replies` item: the last user turn, every model's reply, the reference (cut to `width`)."""
    def cell(text: str | None) -> str:
        text = " ".join((text or "").split()).replace("|", "\\|")
        return text if len(text) <= width else text[: width - 1] + "…"

    items = [it for it in results.get("items", []) if it["suite"] == "replies"]
    roles = roles_of(dict.fromkeys(it["model"] for it in items))
    rows: dict[int, dict[str, str]] = {}
    for it in items:
        row = rows.setdefault(it["id"], {"prompt": cell(it["prompt"]), **dict.fromkeys(roles, ""), "reference": ""})
        row[it["model"]] = cell(it["reply"])
        row["reference"] = cell(it.get("reference")) or "-"
    return [rows[i] for i in sorted(rows)]


def write_report(results: dict[str, Any], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    pictures = []
    for suite_name, per_model in results["suites"].items():
        metrics_png(suite_name, per_model, out / f"metrics_{suite_name}.png")
        pictures.append(f"![{suite_name} metrics](metrics_{suite_name}.png)")
        items = [it for it in results["items"] if it["suite"] == suite_name]
        if suite_name == "judge_pairwise":
            if verdicts_png(items, out / "verdicts_judge_pairwise.png"):
                pictures.append("![judge_pairwise verdicts](verdicts_judge_pairwise.png)")
            continue
        if scores_png(suite_name, items, out / f"scores_{suite_name}.png"):
            pictures.append(f"![{suite_name} per-item scores](scores_{suite_name}.png)")
        if suite_name == "judge_single" and categories_png(items, out / "categories_judge_single.png"):
            pictures.append("![judge_single per category](categories_judge_single.png)")
    (out / "eval_report.md").write_text(markdown(results, pictures))
    return out


def log_results(config: ExperimentConfig, results: dict[str, Any], reports_dir: Path | None) -> str:
    """An MLflow evaluation run with the metrics, per-item tables and the report; tags on the model version."""
    from mlflow.entities import Metric

    results = redact.redact(results)  # the judge's URL and any error text may carry credentials
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
    metrics = [Metric(metric_key(suite_name, role, metric), float(value), now, 0)
               for suite_name, per_model in results["suites"].items()
               for role, values in per_model.items() for metric, value in values.items()]
    if "judge" in results:
        metrics += [Metric(f"judge.{key}", float(value), now, 0) for key, value in results["judge"].items()
                    if isinstance(value, (int, float)) and not isinstance(value, bool)]
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
        if "judge" in results:
            answers = {role: {int(q): turns for q, turns in by_q.items()} for role, by_q in results["answers"].items()}
            judged = [it for it in results["items"] if it["suite"].startswith("judge_")]
            fastchat.write(out / "fastchat", results["judge"]["name"], answers, judged)
        for role, harness in results.get("harness", {}).items():
            (out / f"lm_eval_results_{role}.json").write_text(json.dumps(harness, indent=1, default=str))
        write_report(results, out / "report")
        mlflow_client.log_artifacts(run_id, str(out))
        if reports_dir is not None:
            reports_dir.mkdir(parents=True, exist_ok=True)
            for item in (out / "report").iterdir():
                atomic.write_bytes(reports_dir / item.name, item.read_bytes())
    if version is not None:
        for suite_name, per_model in results["suites"].items():
            for metric, value in per_model.get("candidate", {}).items():
                mlflow_client.set_model_version_tag(name, version, f"eval.{suite_name}.{metric}", f"{value:.6f}")
        if "judge" in results:
            mlflow_client.set_model_version_tag(name, version, "eval.judge.summary", judge_line(results["judge"])[:5000])
        mlflow_client.set_model_version_tag(name, version, "loraforge.eval_run_id", run_id)
        if "candidate" in results.get("adapters", {}):
            found = results["adapters"]["candidate"]
            mlflow_client.set_model_version_tag(name, version, ADAPTER_CHECK_TAG, "passed" if found["ok"] else
                                                f"failed: {redact.redact_text(found['reason'])}"[:5000])
    mlflow_client.set_terminated(run_id, status="FAILED" if results["failed"] else "FINISHED")
    return run_id
