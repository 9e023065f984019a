"""`loraforge models` and `loraforge runs`: the registry and the sweeps as terminal tables."""

from __future__ import annotations

import time
from typing import Any

from pipeline import redact, tracking



def _when(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(ms / 1000)) if ms else "-"


def _metrics(tags: dict[str, str], limit: int = 4) -> str:
    shown = [f"{k.removeprefix('eval.')}={float(v):.4f}" for k, v in sorted(tags.items())
             if k.startswith("eval.") and k.count(".") >= 2 and _is_number(v)]
    return ", ".join(shown[:limit]) + (f" (+{len(shown) - limit})" if len(shown) > limit else "") or "-"


def _is_number(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def model_rows(tracking_uri: str, name: str | None) -> list[dict[str, str]]:
    mlflow_client = tracking.client(tracking_uri)
    names = [name] if name else [m.name for m in mlflow_client.search_registered_models(max_results=200)]
    rows = []
    for model_name in names:
        model = mlflow_client.get_registered_model(model_name)
        aliases: dict[str, list[str]] = {}
        for alias, version in (model.aliases or {}).items():
            aliases.setdefault(str(version), []).append(alias)
        for version in mlflow_client.search_model_versions(f"name = '{model_name}'", max_results=200):
            tags = version.tags
            rows.append({
                "model": model_name, "version": str(version.version),
                "aliases": ", ".join(sorted(aliases.get(str(version.version), []))) or "-",
                "metrics": _metrics(tags),
                "base": tags.get("loraforge.base.name", "-"),
                "lora": (f"r={tags['loraforge.lora.r']} {tags.get('loraforge.lora.target_modules', '')}"
                         if "loraforge.lora.r" in tags else "-"),
                "promotion": tags.get("loraforge.promotion.decision", "-"),
                "created": _when(version.creation_timestamp),
            })
    return sorted(rows, key=lambda r: (r["model"], -int(r["version"])))


def run_rows(tracking_uri: str, experiment: str | None) -> list[dict[str, str]]:
    mlflow_client = tracking.client(tracking_uri)
    experiments = ([mlflow_client.get_experiment_by_name(experiment)] if experiment
                   else mlflow_client.search_experiments(max_results=200))
    rows = []
    for exp in [e for e in experiments if e is not None]:
        sweeps = mlflow_client.search_runs([exp.experiment_id], "tags.`loraforge.kind` = 'sweep'", max_results=200,
                                           order_by=["attributes.start_time DESC"])
        for run in sweeps:
            params = run.data.params
            metric, mode = params.get("sweep.metric", "-"), params.get("sweep.mode", "max")
            trials = mlflow_client.search_runs([exp.experiment_id],
                                               f"tags.`{tracking.PARENT_TAG}` = '{run.info.run_id}'", max_results=1000)
            values = [t.data.metrics[f"best_{metric}"] for t in trials if f"best_{metric}" in t.data.metrics]
            best = (max if mode == "max" else min)(values) if values else None
            rows.append({
                "experiment": exp.name, "sweep": run.info.run_name or run.info.run_id[:8], "run id": run.info.run_id,
                "trials": str(len(trials)), "metric": metric, "best": "-" if best is None else f"{best:.4f}",
                "status": run.info.status, "registered": run.data.tags.get("loraforge.registered_model_uri", "-"),
                "started": _when(run.info.start_time),
            })
    return rows


def print_rows(rows: list[dict[str, Any]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in (rows[0] if rows else {"(none)": ""}):
        table.add_column(column)
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    Console(width=200).print(table)


def title(what: str, tracking_uri: str) -> str:
    return f"{what} in {redact.redact_text(tracking_uri)}"
