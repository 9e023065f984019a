"""What every benchmark suite provides, and the registry of suites by name.

A suite is split where the work is done. `items` (driver) lists what is scored;
`outputs` (a Ray task holding the model) runs the model over one shard of items;
`score` (driver) turns the gathered outputs into metrics and per-item scores. Metric
names are lowercase MLflow-safe identifiers.
"""

from __future__ import annotations

import re
from typing import Any, Protocol

from pipeline.config import SUITES, ExperimentConfig

NAMES = SUITES


class Suite(Protocol):
    name: str
    shardable: bool  # may a model's items be split over several tasks

    def check(self, config: ExperimentConfig) -> list[str]: ...

    def items(self, config: ExperimentConfig) -> list[dict[str, Any]]: ...

    def outputs(self, config: ExperimentConfig, model: Any, tokenizer: Any, items: list[dict[str, Any]],
                progress: Any) -> dict[str, Any]: ...

    def score(self, config: ExperimentConfig, outputs: dict[str, Any]) -> tuple[dict[str, float], list[dict[str, Any]]]: ...


def metric_name(raw: str) -> str:
    """A lowercase MLflow-safe identifier: `ROUGE_L` -> `rouge_l`, `exact_match` stays."""
    return re.sub(r"[^a-z0-9_]+", "_", raw.lower()).strip("_")


def get(name: str) -> Suite:
    from pipeline.eval import classification, e2e_nlg, harness, mt_bench, perplexity

    suites = {s.name: s for s in (classification.SUITE, perplexity.SUITE, e2e_nlg.SUITE, harness.SUITE, mt_bench.SUITE)}
    return suites[name]
