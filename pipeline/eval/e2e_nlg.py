"""`e2e_nlg`: one generated text per meaning representation, scored against all its references
with BLEU, NIST, METEOR, ROUGE-L and CIDEr as the official E2E NLG metrics script defines them.

The eval split has a row per (MR, reference); rows are grouped by MR in file order, so each
instance is scored against every reference of its MR (multi-reference), as in the challenge.
"""

from __future__ import annotations

import shutil
from typing import Any

from pipeline import data
from pipeline.config import DataToTextData, ExperimentConfig
from pipeline.eval import e2e_metrics, generation
from pipeline.eval.suite import metric_name


class E2eNlgSuite:
    name = "e2e_nlg"
    shardable = True

    def check(self, config: ExperimentConfig) -> list[str]:
        if shutil.which("java") is None:
            return ["eval.suites: e2e_nlg needs Java for METEOR and the PTB tokenizer (the official script's jars); "
                    "install a JRE (e.g. apt-get install default-jre-headless) or drop e2e_nlg from the suites"]
        return []

    def items(self, config: ExperimentConfig) -> list[dict[str, Any]]:
        spec = config.data
        assert isinstance(spec, DataToTextData)
        rows = data.load_split(spec.model_copy(update={"max_eval_examples": None}), "eval", config.train.seed)
        grouped: dict[str, list[str]] = {}
        for row in rows:
            grouped.setdefault(row[spec.source_field], []).append(row[spec.target_field])
        instances = list(grouped.items())[: config.eval.e2e_nlg.max_instances]
        return [{"id": i, "mr": mr, "references": refs} for i, (mr, refs) in enumerate(instances)]

    def outputs(self, config: ExperimentConfig, model: Any, tokenizer: Any, items: list[dict[str, Any]],
                progress: Any) -> dict[str, Any]:
        spec = config.data
        prompts = [data.prompt_ids(spec, {spec.source_field: it["mr"]}, tokenizer) for it in items]
        out = generation.generate(model, tokenizer, prompts, config.eval.decoding(self.name), progress=progress)
        return {"items": [{**it, "prediction": text, "new_tokens": n}
                          for it, text, n in zip(items, out.texts, out.per_item_tokens)],
                "gen_tokens": out.new_tokens, "gen_seconds": out.seconds}

    def score(self, config: ExperimentConfig, outputs: dict[str, Any]) -> tuple[dict[str, float], list[dict[str, Any]]]:
        items = outputs["items"]
        references = [it["references"] for it in items]
        # an empty output would stall METEOR's Java process; the official script never sees one
        hypotheses = [it["prediction"] or "-" for it in items]
        scores = e2e_metrics.score(references, hypotheses)
        scored = [{**it, "score": e2e_metrics.bleu_nist([refs], [hyp])[0]}
                  for it, refs, hyp in zip(items, references, hypotheses)]
        return {metric_name(k): float(v) for k, v in scores.items()}, scored


SUITE = E2eNlgSuite()
