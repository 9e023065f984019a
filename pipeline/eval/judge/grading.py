"""The three judging modes, each a list of judge requests turned into items and summary metrics.

Every item ends in exactly one state: `scored`; `unparseable` (replies came back, none with a
valid rating, after `judge.reasks` re-asks, each attempt recorded); or `failed` (no reply, the
reason kept). Nothing is dropped, and nothing unscored gets a default score: summary means are
over scored items only, with the unscored counted beside them.
"""

from __future__ import annotations

import random
import statistics
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from pipeline.eval.judge import prompts, uncertainty
from pipeline.eval.judge.client import Failure, JudgeClient, Reply
from pipeline.eval.judge.inputs import Question
from pipeline.eval.suite import metric_name

SCORED, UNPARSEABLE, FAILED = "scored", "unparseable", "failed"


@dataclass
class Ask:
    """One judgment to obtain: the messages, how to read a reply, how to re-ask."""

    messages: list[dict[str, str]]
    parse: Callable[[str], Any]  # reply text -> parsed value, or None when it has no valid rating
    mode: str  # single | pairwise | side_by_side (which re-ask text)
    n: int = 0  # side_by_side: answers in the prompt
    status: str = ""
    value: Any = None
    reply: Reply | None = None
    reason: str | None = None
    attempts: list[dict[str, Any]] = field(default_factory=list)


def obtain(client: JudgeClient, ask: Ask) -> Ask:
    messages = ask.messages
    for round_ in range(client.spec.reasks + 1):
        outcome = client.chat(messages)
        if isinstance(outcome, Failure):
            ask.attempts.append({"error": outcome.reason, "requests": outcome.attempts})
            ask.status, ask.reason = FAILED, outcome.reason
            return ask
        ask.reply = outcome
        value = ask.parse(outcome.content)
        ask.attempts.append({"judgment": outcome.content, "finish_reason": outcome.finish_reason,
                             "cached": outcome.cached, "parsed": value is not None})
        if value is not None:
            ask.status, ask.value = SCORED, value
            return ask
        if round_ < client.spec.reasks:
            messages = prompts.reask_messages(ask.mode, messages, outcome.content, ask.n)
    ask.status = UNPARSEABLE
    ask.reason = f"no valid rating in {len(ask.attempts)} replies"
    return ask


def obtain_all(client: JudgeClient, asks: list[Ask], progress: Any = None) -> list[Ask]:
    def one(ask: Ask) -> Ask:
        done = obtain(client, ask)
        if progress is not None:
            progress.update(1)
        return done

    with ThreadPoolExecutor(max_workers=client.spec.concurrency, thread_name_prefix="judge") as pool:
        return list(pool.map(one, asks))


def _messages_turns(question: Question, answers: list[str], turn: int) -> tuple[list[str], list[str]]:
    return list(question.turns[:turn]), list(answers[:turn])


def _item(mode: str, model: str, question: Question, turn: int, **extra: Any) -> dict[str, Any]:
    return {"suite": f"judge_{mode}", "model": model, "id": f"{question.question_id}-t{turn}",
            "question_id": question.question_id, "turn": turn, "category": question.category, "mode": mode, **extra}


def _state(ask: Ask) -> dict[str, Any]:
    out: dict[str, Any] = {"status": ask.status, "user_prompt": ask.messages[-1]["content"], "attempts": ask.attempts}
    if ask.reason and ask.status != SCORED:
        out["reason"] = ask.reason
    if ask.reply is not None:
        out["judgment"] = ask.reply.content
    return out


# --- single-answer grading, 1-10 -------------------------------------------------------------

def single(client: JudgeClient, judge_prompts: dict[str, prompts.JudgePrompt], questions: list[Question],
           answers: dict[str, dict[int, list[str]]], references: dict[int, list[str]], progress: Any = None
           ) -> list[dict[str, Any]]:
    plan = []
    for model, by_question in answers.items():
        for q in questions:
            for turn in range(1, len(q.turns) + 1):
                reference = references.get(q.question_id)
                name = prompts.prompt_name("single", q.category, turn, reference is not None)
                asked, answered = _messages_turns(q, by_question[q.question_id], turn)
                messages = prompts.single_messages(judge_prompts[name], asked, answered, turn, reference)
                plan.append((model, q, turn, name, Ask(messages, prompts.parse_rating, "single")))
    obtain_all(client, [p[-1] for p in plan], progress)
    items = []
    for model, q, turn, name, ask in plan:
        item = _item("single", model, q, turn, judge_prompt=name, score=ask.value, **_state(ask))
        if ask.status == SCORED and ask.reply is not None:
            weighted = prompts.weighted_rating(ask.reply.logprobs, ask.reply.content)
            if weighted is not None:
                item["weighted_score"] = weighted
        items.append(item)
    return items


def scores_per_model(items: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per model: the counts of each state and the mean over scored items only."""
    out = {}
    for model in dict.fromkeys(it["model"] for it in items):
        mine = [it for it in items if it["model"] == model]
        out[model] = _counts(mine)
        scores = [it["score"] for it in mine if it["status"] == SCORED]
        if scores:
            out[model]["score_mean"] = statistics.fmean(scores)
    return out


def single_metrics(items: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    out = scores_per_model(items)
    for model in out:
        mine = [it for it in items if it["model"] == model]
        weighted = [it["weighted_score"] for it in mine if "weighted_score" in it]
        if weighted:
            out[model]["weighted_score_mean"] = statistics.fmean(weighted)
        for group in ("turn", "category"):
            for value in sorted({it[group] for it in mine if it[group] != ""}, key=str):
                chosen = [it["score"] for it in mine if it[group] == value and it["status"] == SCORED]
                if chosen:
                    name = f"score_mean_turn{value}" if group == "turn" else f"score_mean_{metric_name(str(value))}"
                    out[model][name] = statistics.fmean(chosen)
    return out


def _counts(items: list[dict[str, Any]]) -> dict[str, float]:
    return {"items": float(len(items)), "scored": float(sum(it["status"] == SCORED for it in items)),
            "unparseable": float(sum(it["status"] == UNPARSEABLE for it in items)),
            "failed": float(sum(it["status"] == FAILED for it in items))}


# --- pairwise, both orders -------------------------------------------------------------------

def pairwise(client: JudgeClient, judge_prompts: dict[str, prompts.JudgePrompt], questions: list[Question],
             answers: dict[str, dict[int, list[str]]], references: dict[int, list[str]], opponent: str,
             progress: Any = None) -> list[dict[str, Any]]:
    """The candidate against `opponent` per question and turn, judged as (A, B) and again as (B, A)."""
    plan = []
    for q in questions:
        for turn in range(1, len(q.turns) + 1):
            reference = references.get(q.question_id)
            name = prompts.prompt_name("pairwise", q.category, turn, reference is not None)
            asked, mine = _messages_turns(q, answers["candidate"][q.question_id], turn)
            _, theirs = _messages_turns(q, answers[opponent][q.question_id], turn)
            g1 = Ask(prompts.pair_messages(judge_prompts[name], asked, mine, theirs, turn, reference),
                     prompts.parse_verdict, "pairwise")
            g2 = Ask(prompts.pair_messages(judge_prompts[name], asked, theirs, mine, turn, reference),
                     prompts.parse_verdict, "pairwise")
            plan.append((q, turn, name, g1, g2, len(mine[-1]), len(theirs[-1])))
    obtain_all(client, [a for p in plan for a in p[3:5]], progress)
    items = []
    for q, turn, name, g1, g2, length_candidate, length_opponent in plan:
        # FastChat's g1_winner / g2_winner, in model terms
        g1_winner = {"A": "candidate", "B": opponent}.get(g1.value, g1.value)
        g2_winner = {"A": opponent, "B": "candidate"}.get(g2.value, g2.value)
        states = {g1.status, g2.status}
        status = FAILED if FAILED in states else UNPARSEABLE if UNPARSEABLE in states else SCORED
        item = _item("pairwise", "candidate", q, turn, opponent=opponent, judge_prompt=name, status=status,
                     g1_winner=g1_winner, g2_winner=g2_winner, g1=_state(g1), g2=_state(g2), score=None,
                     length_candidate=length_candidate, length_opponent=length_opponent)
        if status == SCORED:
            # a win needs both orders to agree; disagreement, or a tie first, is a tie
            verdict = ("win" if g1_winner == g2_winner == "candidate" else
                       "loss" if g1_winner == g2_winner == opponent else "tie")
            item.update(verdict=verdict, consistent=g1_winner == g2_winner,
                        score={"win": 1.0, "tie": 0.5, "loss": 0.0}[verdict])
        else:
            item["reason"] = next(a.reason for a in (g1, g2) if a.status == status)
        items.append(item)
    return items


def pairwise_metrics(items: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    scored = [it for it in items if it["status"] == SCORED]
    metrics = _counts(items)
    n = len(scored)
    if n:
        wins, ties, losses = (sum(it["verdict"] == v for it in scored) for v in ("win", "tie", "loss"))
        metrics.update(win_rate=wins / n, tie_rate=ties / n, loss_rate=losses / n,
                       win_rate_adjusted=(wins + 0.5 * ties) / n,
                       consistency=sum(it["consistent"] for it in scored) / n,
                       swap_inconsistency=sum(not it["consistent"] for it in scored) / n)
        if all("length_candidate" in it for it in scored):  # items judged before lengths were recorded lack them
            metrics.update(win_rate_lc=uncertainty.length_controlled_win_rate(scored),
                           mean_length_candidate=statistics.fmean(it["length_candidate"] for it in scored),
                           mean_length_opponent=statistics.fmean(it["length_opponent"] for it in scored))
    return {"candidate": metrics}


# --- side-by-side, N answers graded 1-9 in one prompt -----------------------------------------

def side_by_side(client: JudgeClient, questions: list[Question], answers: dict[str, dict[int, list[str]]], seed: int,
                 progress: Any = None) -> list[dict[str, Any]]:
    """Turn 1 of each question: every model's answer in one prompt, in an order shuffled per question (seeded)."""
    plan = []
    for q in questions:
        order = list(answers)
        random.Random(f"{seed}:{q.question_id}").shuffle(order)
        labels = prompts.side_by_side_labels(len(order))
        mapping = dict(zip(labels, order))
        messages = prompts.side_by_side_messages(q.turns[0], [answers[m][q.question_id][0] for m in order])

        def parse(text: str, n: int = len(order)) -> dict[str, int | None] | None:
            ratings = prompts.parse_side_by_side(text, n)
            return ratings if all(v is not None for v in ratings.values()) else None

        plan.append((q, mapping, Ask(messages, parse, "side_by_side", n=len(order))))
    obtain_all(client, [p[-1] for p in plan], progress)
    items = []
    for q, mapping, ask in plan:
        # a reply that rated some answers scores those; the others stay unparseable
        partial = prompts.parse_side_by_side(ask.reply.content, len(mapping)) if ask.reply is not None else {}
        for label, model in mapping.items():
            state = _state(ask)
            rating = (ask.value or partial).get(label) if ask.status != FAILED else None
            if ask.status != FAILED:
                state["status"] = SCORED if rating is not None else UNPARSEABLE
                if rating is not None:
                    state.pop("reason", None)
                else:
                    state.setdefault("reason", f"no rating for answer {label}")
            items.append(_item("side_by_side", model, q, 1, label=label, order=mapping, score=rating, **state))
    return items


def side_by_side_metrics(items: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    return scores_per_model(items)


def not_scored_fraction(metrics: dict[str, dict[str, float]]) -> float:
    items = sum(m["items"] for m in metrics.values())
    return (items - sum(m["scored"] for m in metrics.values())) / items if items else 0.0
