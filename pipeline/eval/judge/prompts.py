"""Judge prompts and the parsing of judge replies, as FastChat's llm_judge does it.

Prompts come from FastChat's `judge_prompts.jsonl`: `single-v1` (1-10 rating), `pair-v2` (verdict
[[A]]/[[B]]/[[C]]) and their `-math-v1` variants with a reference answer for the math, reasoning
and coding categories, each in a `-multi-turn` form that grades turn 2. Side-by-side grading
(several answers to one question rated 1-9 in one prompt) has a prompt of our own, below.

Parsing follows FastChat's `run_judge_single` / `run_judge_pair`, with one difference: a rating
outside the scale is unparseable here (FastChat keeps whatever number it finds).
"""

from __future__ import annotations

import ast
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

NEED_REF_CATEGORIES = ("math", "reasoning", "coding")  # FastChat's NEED_REF_CATS
SINGLE_SCALE = (1.0, 10.0)
SIDE_BY_SIDE_SCALE = (1, 9)

# FastChat's patterns: "[[8]]" first, then "[8]"; decimals allowed
ONE_SCORE = re.compile(r"\[\[(\d+\.?\d*)\]\]")
ONE_SCORE_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")

SIDE_BY_SIDE_SYSTEM = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by {n} AI assistants to "
    "the user question displayed below. Grade each response on its own merits on a scale of 1 to 9, where 1 is "
    "very poor and 9 is excellent, considering helpfulness, relevance, accuracy, depth, creativity and level of "
    "detail. Do not let the order of the responses, their length or the assistants' names influence you. Begin "
    "with a short explanation comparing the responses, then output one line per assistant in exactly this format:"
    "\n{format}"
)
REASK = {
    "single": ("Your reply did not contain a rating in the required format. Rate the response on a scale of 1 to 10 "
               "by strictly following this format: \"[[rating]]\", for example: \"Rating: [[5]]\"."),
    "pairwise": ("Your reply did not contain a verdict in the required format. Output your final verdict by strictly "
                 "following this format: \"[[A]]\" if assistant A is better, \"[[B]]\" if assistant B is better, "
                 "and \"[[C]]\" for a tie."),
    "side_by_side": "Your reply did not rate every assistant in the required format. Output one line per assistant:\n{format}",
}


class PromptFileError(ValueError):
    pass


@dataclass(frozen=True)
class JudgePrompt:
    name: str
    type: str  # single | pairwise
    system_prompt: str
    prompt_template: str
    output_format: str


def load_prompts(path: Path) -> dict[str, JudgePrompt]:
    prompts = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompt = JudgePrompt(row["name"], row["type"], row["system_prompt"], row["prompt_template"],
                                 row["output_format"])
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise PromptFileError(f"{path}:{number}: not a judge prompt row ({err.__class__.__name__}: {err}); "
                                  "expected FastChat's judge_prompts.jsonl") from None
        prompts[prompt.name] = prompt
    needed = ["single-v1", "single-math-v1", "single-v1-multi-turn", "single-math-v1-multi-turn",
              "pair-v2", "pair-math-v1", "pair-v2-multi-turn", "pair-math-v1-multi-turn"]
    missing = [n for n in needed if n not in prompts]
    if missing:
        raise PromptFileError(f"{path}: no judge prompt named {', '.join(missing)}")
    return prompts


def prompt_name(mode: str, category: str, turn: int, has_reference: bool) -> str:
    """FastChat's choice: the math prompt (with the reference) for math/reasoning/coding, multi-turn for turn 2."""
    base = {"single": "single-v1", "pairwise": "pair-v2"}[mode]
    if category in NEED_REF_CATEGORIES and has_reference:
        base = {"single": "single-math-v1", "pairwise": "pair-math-v1"}[mode]
    return base + ("-multi-turn" if turn == 2 else "")


def _reference_kwargs(reference: list[str] | None) -> dict[str, str]:
    if not reference:
        return {}
    return {"ref_answer_1": reference[0], "ref_answer_2": reference[1] if len(reference) > 1 else ""}


def single_messages(prompt: JudgePrompt, questions: list[str], answers: list[str], turn: int,
                    reference: list[str] | None) -> list[dict[str, str]]:
    kwargs = _reference_kwargs(reference)
    if turn == 2:
        user = prompt.prompt_template.format(question_1=questions[0], question_2=questions[1], answer_1=answers[0],
                                             answer_2=answers[1], **kwargs)
    else:
        user = prompt.prompt_template.format(question=questions[0], answer=answers[0], **kwargs)
    return [{"role": "system", "content": prompt.system_prompt}, {"role": "user", "content": user}]


def pair_messages(prompt: JudgePrompt, questions: list[str], answers_a: list[str], answers_b: list[str], turn: int,
                  reference: list[str] | None) -> list[dict[str, str]]:
    kwargs = _reference_kwargs(reference)
    if turn == 2:
        user = prompt.prompt_template.format(question_1=questions[0], question_2=questions[1],
                                             answer_a_1=answers_a[0], answer_b_1=answers_b[0],
                                             answer_a_2=answers_a[1], answer_b_2=answers_b[1], **kwargs)
    else:
        user = prompt.prompt_template.format(question=questions[0], answer_a=answers_a[0], answer_b=answers_b[0],
                                             **kwargs)
    return [{"role": "system", "content": prompt.system_prompt}, {"role": "user", "content": user}]


def side_by_side_labels(n: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(n)]


def side_by_side_format(n: int) -> str:
    return "\n".join(f"{label}: [[rating]]" for label in side_by_side_labels(n))


def side_by_side_messages(question: str, answers: list[str]) -> list[dict[str, str]]:
    """N answers to one question, labelled A, B, ... in the order given (the caller shuffles)."""
    labels = side_by_side_labels(len(answers))
    system = SIDE_BY_SIDE_SYSTEM.format(n=len(answers), format=side_by_side_format(len(answers)))
    body = [f"[User Question]\n{question}\n"]
    for label, answer in zip(labels, answers):
        body.append(f"[The Start of Assistant {label}'s Answer]\n{answer}\n[The End of Assistant {label}'s Answer]\n")
    return [{"role": "system", "content": system}, {"role": "user", "content": "\n".join(body)}]


def reask_messages(mode: str, messages: list[dict[str, str]], reply: str, n: int = 0) -> list[dict[str, str]]:
    """The conversation so far plus the judge's unparseable reply and a request for the missing format."""
    text = REASK[mode].format(format=side_by_side_format(n)) if mode == "side_by_side" else REASK[mode]
    return [*messages, {"role": "assistant", "content": reply}, {"role": "user", "content": text}]


def parse_rating(judgment: str, scale: tuple[float, float] = SINGLE_SCALE) -> float | None:
    """FastChat's single-answer rating: `[[N]]`, else `[N]`; None when absent or outside the scale."""
    match = ONE_SCORE.search(judgment) or ONE_SCORE_BACKUP.search(judgment)
    if not match:
        return None
    rating = float(ast.literal_eval(match.group(1)))
    return rating if scale[0] <= rating <= scale[1] else None


def rating_span(judgment: str) -> tuple[int, int] | None:
    """Where the parsed rating's digits are in the text (for its tokens' log-probabilities)."""
    match = ONE_SCORE.search(judgment) or ONE_SCORE_BACKUP.search(judgment)
    return match.span(1) if match else None


def parse_verdict(judgment: str) -> str | None:
    """FastChat's pairwise verdict: A, B or tie (`[[C]]`), checked in that order; None when absent."""
    if "[[A]]" in judgment:
        return "A"
    if "[[B]]" in judgment:
        return "B"
    if "[[C]]" in judgment:
        return "tie"
    return None


def parse_side_by_side(judgment: str, n: int) -> dict[str, int | None]:
    """Each label's rating from its own `X: [[n]]` line (the last such line wins); None when absent or off 1-9."""
    ratings: dict[str, int | None] = {}
    for label in side_by_side_labels(n):
        found = re.findall(rf"(?m)^\W*(?:Assistant\s+)?{label}\W*:\s*\[\[(\d+)\]\]", judgment)
        value = int(found[-1]) if found else None
        ratings[label] = value if value is not None and SIDE_BY_SIDE_SCALE[0] <= value <= SIDE_BY_SIDE_SCALE[1] else None
    return ratings


def weighted_rating(logprobs: list[dict[str, Any]] | None, judgment: str,
                    scale: tuple[float, float] = SINGLE_SCALE) -> float | None:
    """G-Eval's probability-weighted rating: the expectation over the rating token's top alternatives.

    `logprobs` is the reply's `choices[0].logprobs.content` (token, logprob, top_logprobs). The
    token at the rating's first digit is found by offsets; its alternatives that are whole numbers
    on the scale are renormalised. A two-token "10" is read at its first token, where "1" stands
    for both 1 and 10: an approximation, as in G-Eval.
    """
    span = rating_span(judgment)
    if not logprobs or span is None:
        return None
    offset = 0
    for entry in logprobs:
        token = entry.get("token", "")
        if offset <= span[0] < offset + len(token):
            weights: dict[int, float] = {}
            for alt in entry.get("top_logprobs") or [{"token": token, "logprob": entry.get("logprob", 0.0)}]:
                digits = re.fullmatch(r"\W*(\d+)\W*", str(alt.get("token", "")))  # "8", " 8", "[[8" or "8]]"
                if digits and scale[0] <= int(digits.group(1)) <= scale[1]:
                    value = int(digits.group(1))
                    weights[value] = weights.get(value, 0.0) + math.exp(float(alt["logprob"]))
            total = sum(weights.values())
            return sum(k * w for k, w in weights.items()) / total if total > 0 else None
        offset += len(token)
    return None
