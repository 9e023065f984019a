"""Judge calibration: how well the configured judge agrees with labelled judgments.

`loraforge judge calibrate CONFIG --labels FILE` sends every labelled single-answer judgment of
FILE to the judge the config names (a remote endpoint, or the local default) exactly as the
labeller saw it, and compares the judge's rating with the label:

- the labels are FastChat judgment-file rows (`model_judgment/*_single.jsonl`): `user_prompt` is
  the user message as the labeller saw it, `judge[1]` the prompt name whose system prompt goes
  with it, `score` the label (-1: none: the row is counted as unlabelled and not sent);
- the judge's reply is read as the stage reads it (FastChat's `[[N]]`, the same re-asks, cache
  and item states); an item it does not rate is counted (`unparseable` or `failed`), never
  dropped from the counts and never given a rating;
- agreement over the rated items: Spearman, Kendall tau-b, Pearson, mean absolute error, exact
  and within-1 rates, and the parse rate over all labelled items, each with a bootstrap 95 %
  interval (items resampled with replacement, `judge.bootstrap_resamples` times, seeded by
  `judge.seed`); where the judge returns log-probabilities for every rating it gave (OpenAI, vLLM,
  the offline default), the same metrics again for its probability-weighted rating (G-Eval),
  prefixed `weighted_`;
- an MLflow run in the config's experiment (`loraforge.kind: judge_calibration`): the metrics
  plainly named with `_low`/`_high` bounds, the judge's identity (model, weights hash or server
  model id and endpoint, the prompts' sha256, decoding) and the labels' file and sha256 as tags,
  the table, a scatter plot and every item as artifacts.
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import redact, render, tracking
from pipeline.config import ExperimentConfig
from pipeline.eval.judge import grading, inputs, prompts
from pipeline.eval.judge.inputs import InputError

METRICS = ("spearman", "kendall_tau_b", "pearson", "mae", "exact", "within_1", "parse_rate")
KIND_TAG = "loraforge.kind"
KIND = "judge_calibration"


@dataclass(frozen=True)
class Label:
    line: int
    question_id: int
    model: str
    turn: int
    prompt_name: str
    user_prompt: str
    score: float | None  # None: the row has no label (-1)


@dataclass
class Calibration:
    metrics: dict[str, float | None]  # value, and `<name>_low` / `<name>_high`
    counts: dict[str, int]
    items: list[dict[str, Any]] = field(default_factory=list)
    judge: dict[str, Any] = field(default_factory=dict)
    run_id: str | None = None
    seconds: float = 0.0


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_labels(path: Path, judge_prompts: dict[str, prompts.JudgePrompt], limit: int | None = None) -> list[Label]:
    """The labelled rows of a FastChat single-answer judgment file; InputError naming the file and line."""
    labels = []
    for number, row in inputs.jsonl_rows(path, "--labels"):
        where = f"--labels: {path}:{number}"
        judge = row.get("judge")
        if not (isinstance(judge, list) and len(judge) == 2 and all(isinstance(j, str) for j in judge)):
            raise InputError(f"{where}: `judge` must be [judge name, prompt name], as FastChat writes it")
        name = judge[1]
        if name not in judge_prompts:
            raise InputError(f"{where}: prompt {name!r} is not in judge.prompts_path (it has "
                             f"{', '.join(sorted(judge_prompts))})")
        if judge_prompts[name].type != "single":
            raise InputError(f"{where}: prompt {name!r} grades pairs; calibration takes single-answer ratings")
        user_prompt, score = row.get("user_prompt"), row.get("score")
        if not isinstance(user_prompt, str) or not user_prompt.strip():
            raise InputError(f"{where}: `user_prompt` (the judge's user message) is missing or empty")
        if isinstance(score, bool) or not isinstance(score, (int, float)):
            raise InputError(f"{where}: `score` must be a number (the label; -1 for none), got {score!r}")
        low, high = prompts.SINGLE_SCALE
        if score != -1 and not low <= score <= high:
            raise InputError(f"{where}: label {score:g} is outside prompt {name!r}'s scale {low:g}-{high:g} "
                             "(-1 marks a row without a label)")
        labels.append(Label(number, int(row.get("question_id", -1)), str(row.get("model", "")), int(row.get("turn", 1)),
                            name, user_prompt, None if score == -1 else float(score)))
    return labels[:limit]


def messages(label: Label, judge_prompts: dict[str, prompts.JudgePrompt]) -> list[dict[str, str]]:
    """What the labeller's judge was sent: the prompt's system message and the user message as it saw it."""
    return [{"role": "system", "content": judge_prompts[label.prompt_name].system_prompt},
            {"role": "user", "content": label.user_prompt}]


# ----------------------------------------------------------------------------- agreement


def _rank(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def _pearson(x: list[float], y: list[float]) -> float | None:
    n = len(x)
    if n < 2:
        return None
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else None


def _kendall_tau_b(x: list[float], y: list[float]) -> float | None:
    from scipy.stats import kendalltau

    if len(x) < 2 or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    return float(kendalltau(x, y, variant="b").statistic)


def agreement(labels: list[float], ratings: list[float | None]) -> dict[str, float | None]:
    """The metrics over the rated items (None where undefined: fewer than 2 items, or a constant side);
    `parse_rate` over every labelled item."""
    pairs = [(label, rating) for label, rating in zip(labels, ratings) if rating is not None]
    out: dict[str, float | None] = {"parse_rate": len(pairs) / len(labels) if labels else None}
    if not pairs:
        return {**dict.fromkeys(METRICS), **out}
    x, y = [p[0] for p in pairs], [p[1] for p in pairs]
    out["spearman"] = _pearson(_rank(x), _rank(y))
    out["kendall_tau_b"] = _kendall_tau_b(x, y)
    out["pearson"] = _pearson(x, y)
    out["mae"] = sum(abs(a - b) for a, b in pairs) / len(pairs)
    out["exact"] = sum(a == b for a, b in pairs) / len(pairs)
    out["within_1"] = sum(abs(a - b) <= 1 for a, b in pairs) / len(pairs)
    return {name: out[name] for name in METRICS}


def bootstrap(labels: list[float], ratings: list[float | None], resamples: int, seed: int
              ) -> dict[str, tuple[float | None, float | None]]:
    """Percentile 95 % intervals: the labelled items resampled with replacement, the metrics recomputed."""
    import numpy as np

    rng = np.random.default_rng(seed)
    n = len(labels)
    draws: dict[str, list[float]] = {name: [] for name in METRICS}
    for _ in range(resamples):
        picked = rng.integers(0, n, n)
        values = agreement([labels[i] for i in picked], [ratings[i] for i in picked])
        for name, value in values.items():
            if value is not None and not math.isnan(value):
                draws[name].append(value)
    return {name: ((float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))) if d else (None, None))
            for name, d in draws.items()}


# ----------------------------------------------------------------------------- the run


def calibrate(config: ExperimentConfig, labels_path: Path, limit: int | None = None, progress: Any = None,
              judge: Any = None) -> Calibration:
    """Judge every labelled row and measure the agreement; `judge` is an open `judge.stage.Session`."""
    spec = config.judge
    judge_prompts = inputs.load_judge_prompts(spec)
    rows = load_labels(labels_path, judge_prompts, limit)
    labelled = [row for row in rows if row.score is not None]
    began = time.perf_counter()
    asks = [grading.Ask(messages(row, judge_prompts), prompts.parse_rating, "single") for row in labelled]
    grading.obtain_all(judge.client, asks, progress)
    ratings = [ask.value if ask.status == grading.SCORED else None for ask in asks]
    weighted = [prompts.weighted_rating(ask.reply.logprobs, ask.reply.content)
                if ask.status == grading.SCORED and ask.reply is not None else None for ask in asks]
    scores = [row.score for row in labelled]
    metrics: dict[str, float | None] = {}
    sets = [("", ratings)]
    if any(r is not None for r in ratings) and all((w is None) == (r is None) for w, r in zip(weighted, ratings)):
        sets.append(("weighted_", weighted))
    for prefix, values in sets:
        metrics.update({prefix + k: v for k, v in agreement(scores, values).items()})
        for name, (low, high) in bootstrap(scores, values, spec.bootstrap_resamples, spec.seed).items():
            metrics[f"{prefix}{name}_low"], metrics[f"{prefix}{name}_high"] = low, high
    items = []
    for row, ask in zip(labelled, asks):
        item = {"line": row.line, "question_id": row.question_id, "model": row.model, "turn": row.turn,
                "judge_prompt": row.prompt_name, "label": row.score, "rating": ask.value, "status": ask.status,
                "attempts": ask.attempts}
        if ask.reason and ask.status != grading.SCORED:
            item["reason"] = ask.reason
        if (value := weighted[len(items)]) is not None:
            item["weighted_rating"] = value
        items.append(item)
    counts = {"rows": len(rows), "labelled": len(labelled), "unlabelled": len(rows) - len(labelled),
              "rated": sum(r is not None for r in ratings),
              "unparseable": sum(a.status == grading.UNPARSEABLE for a in asks),
              "failed": sum(a.status == grading.FAILED for a in asks)}
    usage = judge.client.usage.summary(spec)
    identity = {"name": judge.name, "model": judge.endpoint.model if spec.base_url else spec.local_model,
                "id": judge.endpoint.judge_id, "base_url": spec.base_url or "local (the rater on 127.0.0.1)",
                "prompts_sha256": sha256_file(spec.prompts_path),
                "decoding": {"temperature": spec.temperature, "max_tokens": spec.max_tokens, "reasks": spec.reasks,
                             "logprobs": spec.logprobs},
                "labels": str(labels_path), "labels_sha256": sha256_file(labels_path), **usage}
    return Calibration(metrics, counts, items, identity, seconds=time.perf_counter() - began)


def fmt(value: float | None) -> str:
    return "undefined" if value is None else f"{value:.3f}"


def table_rows(result: Calibration) -> list[dict[str, str]]:
    names = [prefix + name for prefix in ("", "weighted_") for name in METRICS if prefix + name in result.metrics]
    return [{"metric": name, "value": fmt(result.metrics[name]),
             "95% interval": f"[{fmt(result.metrics[f'{name}_low'])}, {fmt(result.metrics[f'{name}_high'])}]"}
            for name in names]


def scatter_png(result: Calibration, path: Path) -> Path:
    """Label (x) against the judge's rating (y), jittered so that equal pairs show their count."""
    import random

    plt = render.pyplot()
    rng = random.Random(0)
    rated = [(it["label"], it["rating"]) for it in result.items if it["rating"] is not None]
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.scatter([x + rng.uniform(-0.2, 0.2) for x, _ in rated], [y + rng.uniform(-0.2, 0.2) for _, y in rated],
               s=12, alpha=0.5)
    ax.plot([1, 10], [1, 10], color="grey", linewidth=1, linestyle="--")
    ax.set_xlabel("label")
    ax.set_ylabel(f"judge rating ({result.judge['name']})")
    spearman = result.metrics["spearman"]
    ax.set_title(f"{len(rated)} of {result.counts['labelled']} rated; Spearman {fmt(spearman)}")
    ax.set_xlim(0.5, 10.5)
    ax.set_ylim(0.5, 10.5)
    return render.save(plt, fig, path)


def report_md(result: Calibration) -> str:
    counts, judge = result.counts, result.judge
    lines = [f"# Judge calibration: {judge['name']}", "",
             f"Judge `{judge['id']}` at {judge['base_url']}, prompts sha256 `{judge['prompts_sha256'][:12]}`, "
             f"decoding {json.dumps(judge['decoding'])}; labels `{judge['labels']}` (sha256 "
             f"`{judge['labels_sha256'][:12]}`).", "",
             f"{counts['labelled']} labelled items ({counts['unlabelled']} rows without a label not sent): "
             f"{counts['rated']} rated, {counts['unparseable']} unparseable, {counts['failed']} failed. The agreement "
             "metrics are over the rated items; the parse rate is over all labelled items. Intervals: bootstrap 95 % "
             "over items.", "", render.markdown_table(table_rows(result)), ""]
    return "\n".join(lines)


def latest_run(mlflow_client: Any, judge_id: str) -> Any:
    """The newest calibration run of the judge `judge_id` in the tracking store, or None."""
    experiments = [e.experiment_id for e in mlflow_client.search_experiments()]
    if not experiments:
        return None
    quoted = judge_id.replace("'", "\\'")
    runs = mlflow_client.search_runs(experiments, filter_string=f"tags.`{KIND_TAG}` = '{KIND}' and "
                                     f"tags.`loraforge.judge.id` = '{quoted}'",
                                     order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def summary(run: Any) -> dict[str, Any]:
    """What the stage's report says of a judge's calibration: its run, labels and agreement with intervals."""
    metrics = run.data.metrics
    return {"run_id": run.info.run_id, "labels": Path(run.data.tags.get("loraforge.calibration.labels", "")).name,
            "labelled": metrics.get("labelled"),
            **{k: metrics.get(k) for k in ("spearman", "spearman_low", "spearman_high", "weighted_spearman",
                                            "weighted_spearman_low", "weighted_spearman_high", "mae", "parse_rate")}}


def log_run(config: ExperimentConfig, result: Calibration, out_dir: Path | None = None) -> str:
    """The calibration as an MLflow run: metrics, the judge's identity as tags, the report, plot and items."""
    from mlflow.entities import Metric

    uri = config.tracking.tracking_uri
    mlflow_client = tracking.client(uri)
    experiment_id = tracking.ensure_experiment(mlflow_client, config.tracking.experiment_name, uri)
    judge = result.judge
    tags = {KIND_TAG: KIND, "loraforge.judge.name": judge["name"], "loraforge.judge.model": judge["model"],
            "loraforge.judge.id": judge["id"], "loraforge.judge.base_url": redact.redact_text(judge["base_url"]),
            "loraforge.judge.prompts_sha256": judge["prompts_sha256"],
            "loraforge.judge.decoding": json.dumps(judge["decoding"], sort_keys=True),
            "loraforge.calibration.labels": judge["labels"],
            "loraforge.calibration.labels_sha256": judge["labels_sha256"]}
    run = mlflow_client.create_run(experiment_id, run_name=f"judge-calibration-{judge['name']}", tags=tags)
    run_id = run.info.run_id
    now = int(time.time() * 1000)
    metrics = [Metric(name, float(value), now, 0) for name, value in result.metrics.items() if value is not None]
    metrics += [Metric(name, float(value), now, 0) for name, value in result.counts.items()]
    metrics.append(Metric("seconds", result.seconds, now, 0))
    mlflow_client.log_batch(run_id, metrics=metrics)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        (out / "calibration.md").write_text(report_md(result))
        scatter_png(result, out / "calibration_scatter.png")
        with (out / "items.jsonl").open("w") as fh:
            for item in result.items:
                fh.write(json.dumps(redact.redact(item), default=str) + "\n")
        (out / "calibration.json").write_text(json.dumps(redact.redact(
            {"metrics": result.metrics, "counts": result.counts, "judge": judge}), indent=1, default=str))
        mlflow_client.log_artifacts(run_id, str(out))
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            for item in out.iterdir():
                (out_dir / item.name).write_bytes(item.read_bytes())
    mlflow_client.set_terminated(run_id, "FINISHED")
    result.run_id = run_id
    return run_id
