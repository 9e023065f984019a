"""`perplexity`: token cross-entropy and perplexity of the eval split's responses (the prompt is not scored).

Logits are computed only from the first response position of each batch on: with a
49k-entry vocabulary the prompt's logits would be most of the work and are never used.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from pipeline import data
from pipeline.config import ExperimentConfig
from pipeline.eval.suite import sorted_batches


class PerplexitySuite:
    name = "perplexity"
    shardable = True

    def check(self, config: ExperimentConfig) -> list[str]:
        return []

    def items(self, config: ExperimentConfig) -> list[dict[str, Any]]:
        return [{"id": i, "row": row} for i, row in enumerate(data.load_split(config.data, "eval", config.train.seed))]

    @torch.no_grad()
    def outputs(self, config: ExperimentConfig, model: Any, tokenizer: Any, items: list[dict[str, Any]],
                progress: Any) -> dict[str, Any]:
        examples = data.tokenize_rows(config.data, [it["row"] for it in items], tokenizer)
        nll = [0.0] * len(examples)
        tokens = [0] * len(examples)
        for chosen, batch in sorted_batches(model, examples, config.eval.batch_size, tokenizer.pad_token_id):
            labels = batch["labels"]
            scored = (labels != data.IGNORE_INDEX).any(0).nonzero()
            if len(scored):
                first = max(int(scored[0]) - 1, 0)  # logits at t predict token t + 1
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               logits_to_keep=labels.shape[1] - first).logits
                targets = labels[:, first + 1:]  # on the model's device, like the logits
                losses = torch.nn.functional.cross_entropy(
                    logits[:, :-1].float().transpose(1, 2), targets, ignore_index=data.IGNORE_INDEX, reduction="none")
                for row, index in enumerate(chosen):
                    nll[index] = float(losses[row].sum())
                    tokens[index] = int((targets[row] != data.IGNORE_INDEX).sum())
            if progress is not None:
                progress.update(len(chosen))
        return {"items": [{"id": it["id"], "nll": n, "tokens": t} for it, n, t in zip(items, nll, tokens)]}

    def score(self, config: ExperimentConfig, outputs: dict[str, Any]) -> tuple[dict[str, float], list[dict[str, Any]]]:
        items = [it for it in outputs["items"] if it["tokens"]]
        total = sum(it["tokens"] for it in items)
        if not total:
            raise ValueError("no response tokens in the eval split (every response was truncated away)")
        loss = sum(it["nll"] for it in items) / total
        scored = [{**it, "score": it["nll"] / it["tokens"]} for it in items]
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": float(total)}, scored


SUITE = PerplexitySuite()
