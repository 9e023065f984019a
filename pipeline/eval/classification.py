"""`classification`: accuracy, macro-F1, F1 (positive class, two labels) and MCC on the eval split."""

from __future__ import annotations

from typing import Any

import torch

from pipeline import data
from pipeline.config import ExperimentConfig
from pipeline.eval.suite import sorted_batches


class ClassificationSuite:
    name = "classification"
    shardable = True

    def check(self, config: ExperimentConfig) -> list[str]:
        return []  # the eval split's columns are checked with the data

    def items(self, config: ExperimentConfig) -> list[dict[str, Any]]:
        spec = config.data
        rows = data.load_split(spec, "eval", config.train.seed)
        return [{"id": i, "text": row[spec.text_field],
                 **({"text_pair": row[spec.text_pair_field]} if spec.text_pair_field else {}),
                 "label": int(row[spec.label_field])} for i, row in enumerate(rows)]

    @torch.no_grad()
    def outputs(self, config: ExperimentConfig, model: Any, tokenizer: Any, items: list[dict[str, Any]],
                progress: Any) -> dict[str, Any]:
        spec = config.data
        rows = [{spec.text_field: it["text"], spec.label_field: it["label"],
                 **({spec.text_pair_field: it["text_pair"]} if spec.text_pair_field else {})} for it in items]
        examples = data.tokenize_rows(spec, rows, tokenizer)
        predictions = [0] * len(examples)
        for chosen, batch in sorted_batches(model, examples, config.eval.batch_size, tokenizer.pad_token_id):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            for index, predicted in zip(chosen, logits.argmax(-1).tolist()):
                predictions[index] = predicted
            if progress is not None:
                progress.update(len(chosen))
        return {"items": [{"id": it["id"], "label": it["label"], "prediction": p} for it, p in zip(items, predictions)]}

    def score(self, config: ExperimentConfig, outputs: dict[str, Any]) -> tuple[dict[str, float], list[dict[str, Any]]]:
        from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

        items = outputs["items"]
        labels = [it["label"] for it in items]
        predicted = [it["prediction"] for it in items]
        metrics = {
            "accuracy": float(accuracy_score(labels, predicted)),
            "f1_macro": float(f1_score(labels, predicted, average="macro",
                                       labels=list(range(config.data.num_labels)), zero_division=0)),
            "mcc": float(matthews_corrcoef(labels, predicted)),
        }
        if config.data.num_labels == 2:
            metrics["f1"] = float(f1_score(labels, predicted, pos_label=1, zero_division=0))
        return metrics, [{**it, "score": float(it["label"] == it["prediction"])} for it in items]


SUITE = ClassificationSuite()
