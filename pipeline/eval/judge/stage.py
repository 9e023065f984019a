"""The judge suites inside the evaluation stage: check, connect, answer, grade, summarise.

`session` opens the judge before any generation (the local server started, or the remote one
probed with `GET /v1/models`), so a bad judge exits 2 before work is spent. `run` gets every
model's answers to the judge's questions (Ray tasks, through the `mt_bench` suite's generation),
grades them in each mode and returns results shaped like the other suites', plus the usage.
"""

from __future__ import annotations

import logging
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from pipeline.config import JUDGE_SUITES, ConfigError, ExperimentConfig
from pipeline.eval import mt_bench
from pipeline import tracking
from pipeline.eval.judge import calibrate, grading, inputs, uncertainty
from pipeline.eval.judge.cache import ReplyCache
from pipeline.eval.judge.client import JudgeClient, JudgeUnavailable, api_key
from pipeline.eval.judge.server import Endpoint, local_judge, remote_judge_id

log = logging.getLogger("loraforge")


def modes(names: list[str]) -> list[str]:
    return [n for n in names if n in JUDGE_SUITES]


def check(config: ExperimentConfig, names: list[str], roles: list[str] | None = None) -> list[str]:
    """The judge's input problems (files, key, champion), before any model or server runs."""
    names = modes(names)
    if not names:
        return []
    spec = config.judge
    problems = inputs.check(spec, names)
    try:
        api_key(spec)
    except JudgeUnavailable as err:
        problems.append(str(err))
    if roles is not None:
        wanted = []
        if "judge_pairwise" in names:
            wanted.append(("judge.pairwise_against", spec.pairwise_against))
        if "judge_side_by_side" in names:
            wanted += [("judge.side_by_side_models", m) for m in spec.side_by_side_models]
        for field, role in wanted:
            if role == "champion" and "champion" not in roles:
                problems.append(f"{field}: champion, but models:/{config.tracking.registered_model_name}@champion "
                                "does not exist (or is the candidate itself); promote a version first or judge "
                                "against base")
    return problems


@dataclass
class Session:
    client: JudgeClient
    endpoint: Endpoint
    name: str  # how FastChat files and reports name the judge


def _name(config: ExperimentConfig, endpoint: Endpoint) -> str:
    if config.judge.base_url is None:
        return "local-" + Path(config.judge.local_model.removeprefix("pkg:")).stem
    return endpoint.model


@contextmanager
def session(config: ExperimentConfig) -> Iterator[Session]:
    """The judge ready to take requests: the local server up, or the remote one answering with the model listed."""
    spec = config.judge
    try:
        with ExitStack() as stack:
            if spec.base_url is None:
                endpoint = stack.enter_context(local_judge(spec))
            else:
                assert spec.model is not None
                endpoint = Endpoint(spec.base_url, spec.model, remote_judge_id(spec.base_url, spec.model))
            judge = _connect(config, endpoint)
            stack.callback(judge.client.cache.close)
            yield judge
    except JudgeUnavailable as err:
        raise ConfigError([str(err)]) from None


def _connect(config: ExperimentConfig, endpoint: Endpoint) -> Session:
    spec = config.judge
    client = JudgeClient(spec, endpoint.base_url, endpoint.model, endpoint.judge_id, ReplyCache(spec.cache_dir))
    try:
        served = client.served_models()
    except Exception as err:
        raise JudgeUnavailable(f"judge.base_url: cannot list models at {endpoint.base_url}/models "
                               f"({err.__class__.__name__}: {err}); start the server or fix judge.base_url") from None
    if endpoint.model not in served:
        raise JudgeUnavailable(f"judge.model: {endpoint.model!r} is not served at {endpoint.base_url} (it serves "
                               f"{', '.join(served[:10]) or 'nothing'}); set judge.model to one of those")
    log.info("judge %s at %s: ready", endpoint.model if spec.base_url else endpoint.judge_id, endpoint.base_url)
    return Session(client, endpoint, _name(config, endpoint))


def run(config: ExperimentConfig, names: list[str], judge: Session, roles: list[str],
        gather: Callable[[str, list[dict[str, Any]]], dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Every model's answers, then each mode's items and metrics, the failed modes and the judge's usage."""
    from tqdm import tqdm

    spec = config.judge
    questions = inputs.load_questions(spec)
    references = inputs.load_references(spec)
    judge_prompts = inputs.load_judge_prompts(spec)
    began = time.perf_counter()
    items = mt_bench.answer_items(config, [{"question_id": q.question_id, "category": q.category, "turns": list(q.turns)}
                                           for q in questions])
    outputs = gather("mt_bench", items)
    answers = {role: {it["id"]: it["answers"] for it in outputs[role]["items"]} for role in roles}
    answer_seconds = time.perf_counter() - began
    out: dict[str, Any] = {"suites": {}, "items": [], "failed": {}}
    judged_began = time.perf_counter()
    for mode in modes(names):
        total = {"judge_single": sum(len(q.turns) for q in questions) * len(roles),
                 "judge_pairwise": 2 * sum(len(q.turns) for q in questions),
                 "judge_side_by_side": len(questions)}[mode]
        with tqdm(total=total, desc=f"judge {mode.removeprefix('judge_')}", unit="judgment") as progress:
            if mode == "judge_single":
                mode_items = grading.single(judge.client, judge_prompts, questions, answers, references, progress)
                metric_fn = grading.single_metrics
            elif mode == "judge_pairwise":
                mode_items = grading.pairwise(judge.client, judge_prompts, questions, answers, references,
                                              spec.pairwise_against, progress)
                metric_fn = grading.pairwise_metrics
            else:
                pool = {role: answers[role] for role in spec.side_by_side_models}
                for ref in spec.side_by_side:
                    pool[f"ref:{ref.name}"] = inputs.load_answers(ref.path, "judge.side_by_side")
                mode_items = grading.side_by_side(judge.client, questions, pool, spec.seed, progress)
                metric_fn = grading.side_by_side_metrics
        # each metric with its bootstrap 95 % interval over questions (`<metric>_low`, `<metric>_high`)
        metrics = uncertainty.with_intervals(metric_fn, mode_items, spec.bootstrap_resamples, spec.seed)
        out["suites"][mode] = metrics
        out["items"] += mode_items
        fraction = grading.not_scored_fraction(metrics)
        if fraction > spec.max_failed_fraction:
            unparseable = sum(m["unparseable"] for m in metrics.values())
            failed = sum(m["failed"] for m in metrics.values())
            out["failed"][mode] = (f"{fraction:.0%} of the items were not scored ({unparseable:.0f} unparseable, "
                                   f"{failed:.0f} failed), over judge.max_failed_fraction={spec.max_failed_fraction:g}; "
                                   "every item is in the results")
    usage = judge.client.usage.summary(spec)
    calibrated = calibrate.latest_run(tracking.client(config.tracking.tracking_uri), judge.endpoint.judge_id)
    out["judge"] = {"name": judge.name, "id": judge.endpoint.judge_id,
                    "calibration": calibrate.summary(calibrated) if calibrated is not None else None,
                    "base_url": spec.base_url or "local (the rater on 127.0.0.1)",
                    "pairwise_against": spec.pairwise_against, "questions": len(questions),
                    "answer_seconds": answer_seconds, "judge_seconds": time.perf_counter() - judged_began, **usage}
    out["answers"] = {role: {str(qid): turns for qid, turns in by_question.items()} for role, by_question in answers.items()}
    return out
