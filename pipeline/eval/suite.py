"""What every benchmark suite provides (the protocol) and the helpers suites share; the suites by name are in
`pipeline.eval.catalog`.

A suite is split where the work is done. `items` (driver) lists what is scored;
`outputs` (a Ray task holding the model) runs the model over one shard of items;
`score` (driver) turns the gathered outputs into metrics and per-item scores. Metric
names are lowercase MLflow-safe identifiers.
"""

from __future__ import annotations

import re
from typing import Any, Iterator, Protocol, Sequence

from pipeline import data
from pipeline.config import ExperimentConfig
from pipeline.eval.generation import model_device


class Suite(Protocol):
    name: str
    shardable: bool  # may a model's items be split over several tasks

    def check(self, config: ExperimentConfig) -> list[str]: ...

    def items(self, config: ExperimentConfig) -> list[dict[str, Any]]: ...

    def outputs(self, config: ExperimentConfig, model: Any, tokenizer: Any, items: list[dict[str, Any]],
                progress: Any) -> dict[str, Any]: ...

    def score(self, config: ExperimentConfig, outputs: dict[str, Any]) -> tuple[dict[str, float], list[dict[str, Any]]]: ...


def sorted_batches(model: Any, examples: Sequence[Any], batch_size: int, pad_token_id: int
                   ) -> Iterator[tuple[list[int], dict[str, Any]]]:
    """(indices into `examples`, padded batch on the model's device), shortest examples first so a batch pads little."""
    model.eval()
    device = model_device(model)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    for start in range(0, len(order), batch_size):
        chosen = order[start:start + batch_size]
        batch = data.collate([examples[i] for i in chosen], pad_token_id)
        yield chosen, {k: v.to(device) for k, v in batch.items()}


def metric_name(raw: str) -> str:
    """A lowercase MLflow-safe identifier: `ROUGE_L` -> `rouge_l`, `exact_match` stays."""
    return re.sub(r"[^a-z0-9_]+", "_", raw.lower()).strip("_")

