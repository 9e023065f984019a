"""`mt_bench`: answers to the MT-Bench questions, as FastChat's `gen_model_answer` collects them.

Each question has two turns; turn 2 is asked in the same conversation, after turn 1 and the
model's own answer to it. Decoding follows FastChat's temperature per category (writing and
roleplay 0.7; extraction, math, coding, reasoning greedy; stem and humanities 0.1), seeded; a
temperature or do_sample set explicitly in `eval.mt_bench.generation` (else `eval.generation`)
wins. The judge suites get their answers from here too (`answer_items`). Prompts go through the
tokenizer's chat template (a tokenizer without one gets the task's instruction prompt per turn,
the turns concatenated). This suite's own metrics only count the answers; the judge suites
grade them.
"""

from __future__ import annotations

import json
from typing import Any

from pipeline import data, datafiles
from pipeline.config import MT_BENCH_TEMPERATURES, ChatData, ExperimentConfig, GenerationSpec, InstructionData
from pipeline.eval import generation


def answer_decoding(config: ExperimentConfig, category: str) -> GenerationSpec:
    """FastChat's per-category temperature, unless the config sets temperature or do_sample explicitly."""
    spec = config.eval.decoding("mt_bench")
    explicit = spec.model_fields_set if (config.eval.mt_bench.generation is not None
                                         or "generation" in config.eval.model_fields_set) else set()
    if category not in MT_BENCH_TEMPERATURES or explicit & {"temperature", "do_sample"}:
        return spec
    temperature = MT_BENCH_TEMPERATURES[category]
    sampled = temperature >= 1e-4  # FastChat: below that, greedy
    return spec.model_copy(update={"do_sample": sampled, "temperature": temperature if sampled else 1.0})


def answer_items(config: ExperimentConfig, questions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Items to answer, each with its decoding (resolved here, on the driver, where the config's explicit keys are known)."""
    return [{"id": int(q["question_id"]), "category": q.get("category", ""), "turns": list(q["turns"]),
             "generation": answer_decoding(config, q.get("category", "")).model_dump()} for q in questions]


class MtBenchSuite:
    name = "mt_bench"
    shardable = True

    def check(self, config: ExperimentConfig) -> list[str]:
        path = config.eval.mt_bench.questions_path
        problem = datafiles.check_file(path, manifest=datafiles.load_manifest())
        return [f"eval.mt_bench.questions_path: {problem}"] if problem else []

    def items(self, config: ExperimentConfig) -> list[dict[str, Any]]:
        spec = config.eval.mt_bench
        lines = spec.questions_path.read_text(encoding="utf-8").splitlines()
        questions = [json.loads(line) for line in lines if line.strip()][: spec.max_questions]
        return answer_items(config, [{**q, "turns": q["turns"][: spec.turns]} for q in questions])

    def outputs(self, config: ExperimentConfig, model: Any, tokenizer: Any, items: list[dict[str, Any]],
                progress: Any) -> dict[str, Any]:
        answers: list[list[str]] = [[] for _ in items]
        tokens = [0] * len(items)
        total_tokens, seconds = 0, 0.0
        for turn in range(max(len(it["turns"]) for it in items)):
            asked = [i for i, it in enumerate(items) if len(it["turns"]) > turn]
            groups: dict[str, list[int]] = {}  # items decoded alike go in one call
            for i in asked:
                groups.setdefault(json.dumps(items[i].get("generation"), sort_keys=True), []).append(i)
            for key, chosen in groups.items():
                gen = GenerationSpec.model_validate(json.loads(key)) if key != "null" else config.eval.decoding(self.name)
                prompts = [self._prompt(config, tokenizer, items[i]["turns"][: turn + 1], answers[i]) for i in chosen]
                out = generation.generate(model, tokenizer, prompts, gen)
                for i, text, n in zip(chosen, out.texts, out.per_item_tokens):
                    answers[i].append(text)
                    tokens[i] += n
                total_tokens += out.new_tokens
                seconds += out.seconds
        if progress is not None:
            progress.update(len(items))
        return {"items": [{**it, "answers": a, "prediction": a[0], "new_tokens": n}
                          for it, a, n in zip(items, answers, tokens)],
                "gen_tokens": total_tokens, "gen_seconds": seconds}

    @staticmethod
    def _prompt(config: ExperimentConfig, tokenizer: Any, turns: list[str], answers: list[str]) -> list[int]:
        spec = config.data
        if getattr(tokenizer, "chat_template", None) or isinstance(spec, ChatData):
            messages: list[dict[str, str]] = []
            for i, question in enumerate(turns):
                messages.append({"role": "user", "content": question})
                if i < len(answers):
                    messages.append({"role": "assistant", "content": answers[i]})
            if isinstance(spec, ChatData):  # as the conversations were rendered in training
                return data.reply_prompt_ids(spec, messages, tokenizer)
            return data.chat_ids(tokenizer, messages)
        # mt_bench fits data.kinds instruction and chat only
        assert isinstance(spec, InstructionData)
        text = ""
        for i, question in enumerate(turns):
            text += data.prompt_text(spec, {spec.instruction_field: question})
            if i < len(answers):
                text += answers[i] + "\n\n"
        return list(tokenizer(text, add_special_tokens=True)["input_ids"])

    def score(self, config: ExperimentConfig, outputs: dict[str, Any]) -> tuple[dict[str, float], list[dict[str, Any]]]:
        items = outputs["items"]
        answers = [a for it in items for a in it["answers"]]
        metrics = {"questions": float(len(items)), "answers": float(len(answers)),
                   "mean_new_tokens": sum(it["new_tokens"] for it in items) / max(len(answers), 1),
                   "empty_answers": float(sum(not a.strip() for a in answers))}
        return metrics, items


SUITE = MtBenchSuite()
