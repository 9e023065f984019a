"""How sure a judge metric is: bootstrap intervals over questions, and the length-controlled win rate.

- Every judge metric that is a rate or a mean gets a percentile 95 % interval: the questions are
  resampled with replacement (`judge.bootstrap_resamples` times, seeded by `judge.seed`), each
  question bringing all its items (turns, orders), and the metric is computed again (Arena-Hard-Auto
  reports its scores so). The bounds are metrics of their own, `<metric>_low` and `<metric>_high`,
  so they reach `--json`, MLflow and the report like the rest, and a promotion gate can test them.
- The length-controlled win rate (AlpacaEval 2): a logistic regression of the pairwise preference
  (win 1, loss 0, a tie half of each) on the answers' length difference, tanh(d / sd(d)), and the
  win probability it predicts with the length term set to zero, sigmoid(intercept). A judge that
  prefers longer answers raises the raw win rate of a verbose candidate, not this one.
"""

from __future__ import annotations

import math
import random
from typing import Any, Callable

# metrics that count items: no interval
COUNTS = {"items", "scored", "unparseable", "failed"}


def length_controlled_win_rate(scored: list[dict[str, Any]]) -> float | None:
    """sigmoid(intercept) of preference ~ tanh(length difference / its sd), ties split in two half-weighted rows."""
    from sklearn.linear_model import LogisticRegression

    if not scored:
        return None
    diffs = [it["length_candidate"] - it["length_opponent"] for it in scored]
    mean = sum(diffs) / len(diffs)
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / len(diffs))
    xs, ys, ws = [], [], []
    for it, d in zip(scored, diffs):
        x = math.tanh(d / sd) if sd > 0 else 0.0
        target = {"win": 1.0, "tie": 0.5, "loss": 0.0}[it["verdict"]]
        for y, w in ((1, target), (0, 1 - target)):
            if w > 0:
                xs.append([x])
                ys.append(y)
                ws.append(w)
    if len(set(ys)) < 2:  # all wins or all losses: the fit has no finite intercept; the rate is the raw one
        return float(ys[0])
    model = LogisticRegression(penalty=None, max_iter=1000).fit(xs, ys, sample_weight=ws)
    return 1.0 / (1.0 + math.exp(-float(model.intercept_[0])))


def with_intervals(metric_fn: Callable[[list[dict[str, Any]]], dict[str, dict[str, float]]],
                   items: list[dict[str, Any]], resamples: int, seed: int) -> dict[str, dict[str, float]]:
    """`metric_fn(items)` with `<metric>_low` / `<metric>_high` (bootstrap 95 % over questions) beside each
    metric that is not a count."""
    metrics = metric_fn(items)
    by_question: dict[Any, list[dict[str, Any]]] = {}
    for item in items:
        by_question.setdefault(item["question_id"], []).append(item)
    questions = sorted(by_question, key=str)
    if not questions:
        return metrics
    rng = random.Random(seed)
    draws: dict[tuple[str, str], list[float]] = {}
    for _ in range(resamples):
        picked = [q for _ in questions for q in [questions[rng.randrange(len(questions))]]]
        sample = [item for q in picked for item in by_question[q]]
        for model, values in metric_fn(sample).items():
            for name, value in values.items():
                if name not in COUNTS and value is not None and not math.isnan(value):
                    draws.setdefault((model, name), []).append(value)
    for model, values in metrics.items():
        for name in list(values):
            found = sorted(draws.get((model, name), []))
            if name in COUNTS or not found:
                continue
            values[f"{name}_low"] = _percentile(found, 2.5)
            values[f"{name}_high"] = _percentile(found, 97.5)
    return metrics


def _percentile(ordered: list[float], q: float) -> float:
    """numpy's default (linear) percentile of sorted values."""
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)
