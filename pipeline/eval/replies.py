"""`replies`: what each model answers in a conversation (data.kind chat).

The items are the prompts in `eval.replies.prompts` (each a user turn opening a conversation,
e.g. "Who are you?") and the first `eval.replies.max_conversations` held-out conversations, each
asked for its last assistant turn. Every model writes its reply in the chat template as trained;
a held-out conversation's reply is scored against the real one by token F1 (SQuAD's answer
overlap: lowercased, punctuation and articles dropped). The report shows the replies side by side.
"""

from __future__ import annotations

import collections
import re
import string
from typing import Any

from pipeline import chat, data
from pipeline.config import ChatData, ExperimentConfig
from pipeline.eval import generation


def normalized_tokens(text: str) -> list[str]:
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return re.sub(r"\b(a|an|the)\b", " ", text).split()


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD's token F1 between a reply and the reference reply."""
    pred, ref = normalized_tokens(prediction), normalized_tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


class RepliesSuite:
    name = "replies"
    shardable = True

    def check(self, config: ExperimentConfig) -> list[str]:
        spec = config.eval.replies
        if not spec.prompts and spec.max_conversations == 0:
            return ["eval.replies: no prompts and max_conversations 0: nothing to ask; give eval.replies.prompts"]
        return []

    def items(self, config: ExperimentConfig) -> list[dict[str, Any]]:
        spec, data_spec = config.eval.replies, config.data
        assert isinstance(data_spec, ChatData)
        items: list[dict[str, Any]] = [{"messages": [{"role": "user", "content": p}], "reference": None}
                                       for p in spec.prompts]
        rows = data.load_split(data_spec, "eval", config.train.seed)[: spec.max_conversations]
        for row in rows:
            messages = data.conversation(data_spec, row)
            items.append({"messages": chat.prompt_messages(messages), "reference": chat.reply(messages)})
        return [{"id": i, **it} for i, it in enumerate(items)]

    def outputs(self, config: ExperimentConfig, model: Any, tokenizer: Any, items: list[dict[str, Any]],
                progress: Any) -> dict[str, Any]:
        spec = config.data
        assert isinstance(spec, ChatData)
        prompts = [data.reply_prompt_ids(spec, it["messages"], tokenizer) for it in items]
        out = generation.generate(model, tokenizer, prompts, config.eval.decoding(self.name), progress=progress)
        return {"items": [{**it, "prompt": it["messages"][-1]["content"], "reply": text, "new_tokens": n}
                          for it, text, n in zip(items, out.texts, out.per_item_tokens)],
                "gen_tokens": out.new_tokens, "gen_seconds": out.seconds}

    def score(self, config: ExperimentConfig, outputs: dict[str, Any]) -> tuple[dict[str, float], list[dict[str, Any]]]:
        items = outputs["items"]
        scored = [{**it, "score": token_f1(it["reply"], it["reference"]) if it["reference"] is not None else None}
                  for it in items]
        with_reference = [it["score"] for it in scored if it["score"] is not None]
        metrics = {"replies": float(len(items)), "empty_replies": float(sum(not it["reply"].strip() for it in items)),
                   "mean_new_tokens": sum(it["new_tokens"] for it in items) / max(len(items), 1)}
        if with_reference:
            metrics["reference_f1"] = sum(with_reference) / len(with_reference)
        return metrics, scored


SUITE = RepliesSuite()
