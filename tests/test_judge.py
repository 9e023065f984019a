"""The LLM judge: the client over real HTTP against a loopback OpenAI-protocol server with faults,
the three modes, FastChat's parsing on real GPT-4 judgments, the cache, and bad judge input."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.config import JudgeSpec, load_config
from pipeline.datafiles import data_root
from pipeline.eval.judge import grading, inputs, prompts
from pipeline.eval.judge.cache import ReplyCache
from pipeline.eval.judge.client import JudgeClient
from tests.support.openai_fake import FakeJudge, serve

def spec(base_url: str, tmp: Path, **changes) -> JudgeSpec:
    root = data_root()
    values = dict(base_url=base_url, model="gpt-4o-fake", cache_dir=tmp / "cache", backoff_s=0.05, backoff_max_s=2.0,
                  timeout_s=1.0, max_retries=3, concurrency=4, questions_path=root / "mt_bench/question.jsonl",
                  prompts_path=root / "mt_bench/judge_prompts.jsonl",
                  reference_path=root / "mt_bench/reference_answer/gpt-4.jsonl")
    values.update(changes)
    return JudgeSpec(**values)


def client_for(judge_spec: JudgeSpec, judge_id: str = "gpt-4o-fake") -> JudgeClient:
    return JudgeClient(judge_spec, judge_spec.base_url, judge_spec.model, judge_id, ReplyCache(judge_spec.cache_dir))


def answers_for(questions: list[inputs.Question], *models: str) -> dict[str, dict[int, list[str]]]:
    return {m: {q.question_id: [f"{m} answers turn {t + 1} of {q.question_id}." for t in range(len(q.turns))]
                for q in questions} for m in models}


def test_parser_reads_real_gpt4_judgments_as_fastchat_recorded():
    """The 500 GPT-4 judgments of the data manifest (was: a committed 10-row excerpt): each reads to the score
    FastChat recorded."""
    from pipeline import datafiles

    labels = datafiles.require("mt_bench_gpt4_judgments/gpt-4_single.calib500.jsonl")
    rows = [json.loads(line) for line in labels.read_text().splitlines()]
    assert len(rows) == 500 and len({r["score"] for r in rows}) >= 10
    for row in rows:
        assert prompts.parse_rating(row["judgment"]) == row["score"], row["question_id"]
    # FastChat's fallbacks and where we differ: [N] after [[N]], decimals, off-scale is unparseable here
    assert prompts.parse_rating("Rating: [8]") == 8.0
    assert prompts.parse_rating("[[7.5]] though [9]") == 7.5
    assert prompts.parse_rating("Rating: [[11]]") is None and prompts.parse_rating("Rating: [[0]]") is None
    assert prompts.parse_rating("no rating at all") is None
    assert prompts.parse_verdict("... [[B]]") == "B" and prompts.parse_verdict("[[C]]") == "tie"
    assert prompts.parse_verdict("[[A]] or [[B]]") == "A"  # FastChat checks A first
    assert prompts.parse_verdict("A is better") is None


def test_prompts_follow_fastchat_choice_of_template():
    judge_prompts = prompts.load_prompts(data_root() / "mt_bench/judge_prompts.jsonl")
    assert prompts.prompt_name("single", "writing", 1, True) == "single-v1"
    assert prompts.prompt_name("single", "math", 1, True) == "single-math-v1"
    assert prompts.prompt_name("pairwise", "coding", 2, True) == "pair-math-v1-multi-turn"
    assert prompts.prompt_name("single", "math", 2, False) == "single-v1-multi-turn"
    messages = prompts.single_messages(judge_prompts["single-math-v1-multi-turn"], ["q1", "q2"], ["a1", "a2"], 2,
                                       ["r1", "r2"])
    assert messages[0]["role"] == "system" and "### Reference answer:\nr2" in messages[1]["content"]
    assert "### Assistant A:\na2" in messages[1]["content"]


def test_faults_end_every_item_in_one_state_and_a_rerun_sends_nothing(tmp_path: Path):
    fake = FakeJudge(faults={1: "429", 3: "500", 5: "hang", 7: "malformed", 9: "503", 11: "429"}, hang_s=3.0,
                     retry_after="1")
    with serve(fake) as url:
        judge_spec = spec(url, tmp_path, question_ids=[81, 82, 101, 102], turns=2)
        questions = inputs.load_questions(judge_spec)
        fake.no_rating = questions[1].turns[0]  # question 82: every reply to it lacks a rating
        references = inputs.load_references(judge_spec)
        judge_prompts = inputs.load_judge_prompts(judge_spec)
        answers = answers_for(questions, "candidate", "base")
        client = client_for(judge_spec)
        began = time.perf_counter()
        single = grading.single(client, judge_prompts, questions, answers, references)
        pairs = grading.pairwise(client, judge_prompts, questions, answers, references, "base")
        first_seconds = time.perf_counter() - began
        first_requests = len(fake.requests)

        assert len(single) == 4 * 2 * 2 and len(pairs) == 4 * 2
        states = {(it["model"], it["question_id"], it["turn"]): it["status"] for it in single}
        assert all(s == ("unparseable" if q == 82 else "scored") for (_, q, _), s in states.items()), states
        for it in single:
            assert (it["score"] is None) == (it["status"] != "scored")
            if it["question_id"] == 82:  # asked, then re-asked twice, each attempt recorded
                assert len(it["attempts"]) == 3 and not any(a["parsed"] for a in it["attempts"])
            if it["question_id"] in (101, 102):  # reasoning: FastChat's math prompt with the reference answer
                assert it["judge_prompt"].startswith("single-math-v1")
        assert {p["status"] for p in pairs if p["question_id"] == 82} == {"unparseable"}
        assert {p["status"] for p in pairs if p["question_id"] != 82} == {"scored"}
        metrics = grading.single_metrics(single)
        assert metrics["candidate"]["scored"] == 6 and metrics["candidate"]["unparseable"] == 2
        assert metrics["candidate"]["failed"] == 0 and metrics["candidate"]["items"] == 8
        scores = [it["score"] for it in single if it["model"] == "candidate" and it["status"] == "scored"]
        assert metrics["candidate"]["score_mean"] == pytest.approx(sum(scores) / len(scores))
        # every fault was retried; 429's Retry-After (1 s) was waited for
        usage = client.usage
        assert usage.retries == 6 and usage.failed == 0
        assert usage.replies == first_requests - 6 and usage.prompt_tokens > 0 and usage.completion_tokens > 0
        retried = fake.requests[0]
        again = next(i for i, body in enumerate(fake.requests[1:], 1) if body == retried)
        assert fake.times[again] - fake.times[0] >= 1.0
        # a reply once received is never requested again (5 hung past the timeout, 7 was malformed: no reply)
        replied = [json.dumps(b, sort_keys=True) for i, (b, s) in enumerate(zip(fake.requests, fake.statuses))
                   if s == 200 and i not in (4, 6)]
        assert len(replied) == len(set(replied))

        # a second run, fresh client, same cache: zero requests and the same items
        client2 = client_for(judge_spec)
        began = time.perf_counter()
        single2 = grading.single(client2, judge_prompts, questions, answers, references)
        pairs2 = grading.pairwise(client2, judge_prompts, questions, answers, references, "base")
        assert len(fake.requests) == first_requests and client2.usage.requests == 0
        assert [(i["status"], i["score"]) for i in single2] == [(i["status"], i["score"]) for i in single]
        assert [i.get("verdict") for i in pairs2] == [i.get("verdict") for i in pairs]
        assert time.perf_counter() - began < first_seconds


def test_persistent_errors_fail_items_with_their_reason_and_a_dead_judge_stops_early(tmp_path: Path):
    fake = FakeJudge()
    with serve(fake) as url:
        judge_spec = spec(url, tmp_path, question_ids=[81, 83], turns=1, max_retries=2)
        questions = inputs.load_questions(judge_spec)
        fake.always_fail = questions[0].turns[0]
        answers = answers_for(questions, "candidate", "base")
        items = grading.single(client_for(judge_spec), inputs.load_judge_prompts(judge_spec), questions, answers, {})
        failed = [it for it in items if it["question_id"] == 81]
        assert {it["status"] for it in failed} == {"failed"} and all(it["score"] is None for it in failed)
        assert all("HTTP 500" in it["reason"] and it["attempts"][0]["requests"] == 3 for it in failed)
        assert {it["status"] for it in items if it["question_id"] == 83} == {"scored"}
        assert grading.not_scored_fraction(grading.single_metrics(items)) == pytest.approx(0.5)

        # every request fails: after abort_after_failures in a row the rest end failed unsent
        fake.always_fail = "Please act"
        dead = spec(url, tmp_path / "dead", max_questions=10, turns=1, max_retries=1, abort_after_failures=3,
                    concurrency=1)
        questions = inputs.load_questions(dead)
        sent = len(fake.requests)
        items = grading.single(client_for(dead), inputs.load_judge_prompts(dead), questions,
                               answers_for(questions, "candidate"), {})
        assert len(items) == 10 and {it["status"] for it in items} == {"failed"}
        assert len(fake.requests) - sent == 3 * 2  # three items, two requests each; seven never sent
        assert sum("not sent" in it["reason"] for it in items) == 7


@pytest.mark.parametrize("status", [400, 401, 404])
def test_client_errors_fail_at_once_without_a_retry(status: int, tmp_path: Path, monkeypatch):
    """400 (bad request), 401 (wrong key), 404 (no such model): retrying cannot help, so one request each."""
    monkeypatch.setenv("JUDGE_TEST_KEY", "the-right-key" if status != 401 else "a-wrong-key")
    fake = FakeJudge(api_key="the-right-key", faults={1: "400"} if status == 400 else {})
    with serve(fake) as url:
        judge_spec = spec(url, tmp_path, api_key_env="JUDGE_TEST_KEY", max_retries=3, concurrency=1,
                          question_ids=[81], turns=1, **({"model": "no-such-model"} if status == 404 else {}))
        client = client_for(judge_spec, judge_spec.model)
        questions = inputs.load_questions(judge_spec)
        outcome = client.chat([{"role": "user", "content": questions[0].turns[0]}])
        assert not hasattr(outcome, "text"), outcome  # a Failure, not a Reply
        assert outcome.reason.startswith(f"HTTP {status}:"), outcome.reason
        assert fake.posts == 1 and fake.statuses == ([] if status == 401 else [status])
        assert client.usage.retries == 0 and client.usage.requests == 1 and client.usage.failed == 1


class OrderAware(FakeJudge):
    """Prefers the answer that says GOOD, wherever it stands; with neither, always says A (position bias)."""

    def reply_text(self, messages):
        text = messages[-1]["content"]
        a, _, b = text.partition("Assistant B")
        if "GOOD" in a and "GOOD" not in b:
            return "A is better. [[A]]"
        if "GOOD" in b and "GOOD" not in a:
            return "B is better. [[B]]"
        return "The first one. [[A]]"


def test_pairwise_needs_both_orders_to_agree(tmp_path: Path):
    fake = OrderAware()
    with serve(fake) as url:
        judge_spec = spec(url, tmp_path, question_ids=[81, 82, 83], turns=1)
        questions = inputs.load_questions(judge_spec)
        answers = answers_for(questions, "candidate", "base")
        answers["candidate"][81] = ["GOOD answer"]  # 81: the candidate wins in both orders
        answers["base"][82] = ["GOOD answer"]  # 82: the base wins in both orders
        # 83: neither; the judge picks A both times: the orders disagree -> tie
        items = grading.pairwise(client_for(judge_spec), inputs.load_judge_prompts(judge_spec), questions, answers, {},
                                 "base")
        verdicts = {it["question_id"]: (it["verdict"], it["consistent"], it["score"]) for it in items}
        assert verdicts == {81: ("win", True, 1.0), 82: ("loss", True, 0.0), 83: ("tie", False, 0.5)}
        metrics = grading.pairwise_metrics(items)["candidate"]
        assert metrics["win_rate"] == metrics["loss_rate"] == metrics["tie_rate"] == pytest.approx(1 / 3)
        assert metrics["win_rate_adjusted"] == pytest.approx(0.5) and metrics["consistency"] == pytest.approx(2 / 3)
        assert len(fake.requests) == 6  # each question in both orders


def test_side_by_side_shuffles_per_question_and_reads_each_rating(tmp_path: Path):
    fake = FakeJudge()
    with serve(fake) as url:
        judge_spec = spec(url, tmp_path, question_ids=[101, 102, 103, 104], turns=1)
        questions = inputs.load_questions(judge_spec)
        pool = answers_for(questions, "base", "candidate")
        pool["ref:gpt-4"] = inputs.load_references(judge_spec)
        items = grading.side_by_side(client_for(judge_spec), questions, pool, seed=0)
        assert len(items) == 12 and {it["status"] for it in items} == {"scored"}
        orders = {json.dumps(it["order"]) for it in items}
        assert len(orders) > 1  # shuffled per question
        for it in items:
            assert it["order"][it["label"]] == it["model"] and 1 <= it["score"] <= 9
        again = grading.side_by_side(client_for(judge_spec), questions, pool, seed=0)
        assert [i["order"] for i in again] == [i["order"] for i in items]  # seeded
        metrics = grading.side_by_side_metrics(items)
        assert set(metrics) == {"base", "candidate", "ref:gpt-4"} and metrics["ref:gpt-4"]["scored"] == 4
    assert prompts.parse_side_by_side("x\nA: [[3]]\nB: [[12]]\n", 3) == {"A": 3, "B": None, "C": None}


def test_weighted_score_from_logprobs(tmp_path: Path):
    with serve(FakeJudge()) as url:
        judge_spec = spec(url, tmp_path, question_ids=[81], turns=1)
        questions = inputs.load_questions(judge_spec)
        items = grading.single(client_for(judge_spec), inputs.load_judge_prompts(judge_spec), questions,
                               answers_for(questions, "candidate"), {})
    item = items[0]
    n = item["score"]
    weights = {n: math.exp(-0.4), **{k: math.exp(-1.5) for k in (n - 1, n + 1) if 1 <= k <= 10}}
    assert item["weighted_score"] == pytest.approx(sum(k * w for k, w in weights.items()) / sum(weights.values()))
    assert grading.single_metrics(items)["candidate"]["weighted_score_mean"] == pytest.approx(item["weighted_score"])


def test_a_remote_judge_is_known_by_its_endpoint_so_another_server_replays_nothing(tmp_path: Path,
                                                                                    tiny_causal_model: Path):
    """Two servers that serve the same model name are two judges: the cache keys on the endpoint too."""
    from pipeline.eval.judge import stage as judge_stage
    from pipeline.eval.judge.server import remote_judge_id
    from tests.support.configs import write_yaml

    assert remote_judge_id("https://me:pw@Judge.Example:443/v1/?x=1", "m") == "m@https://judge.example:443/v1"
    assert remote_judge_id("http://127.0.0.1:8000/v1", "m") == remote_judge_id("http://127.0.0.1:8000/v1/", "m")
    first, second = FakeJudge(), FakeJudge()
    assert first.model == second.model
    with serve(first) as url_1, serve(second) as url_2:
        for i, url in enumerate((url_1, url_2, url_1 + "/")):
            raw = instruct_config(tmp_path, str(tiny_causal_model), {"base_url": url, "model": first.model,
                                                                     "question_ids": [81]}, ["judge_single"])
            config = load_config(write_yaml(tmp_path / f"c{i}.yaml", raw), env={})
            with judge_stage.session(config) as judge:
                assert judge.endpoint.judge_id == remote_judge_id(url, first.model)
                questions = inputs.load_questions(config.judge)
                items = grading.single(judge.client, inputs.load_judge_prompts(config.judge), questions,
                                       answers_for(questions, "candidate"), inputs.load_references(config.judge))
                assert {it["status"] for it in items} == {"scored"}
            if i == 0:
                asked = first.posts
                assert asked == 2  # two turns
    assert second.posts == asked  # the other server was asked, not replayed from the first one's replies
    assert first.posts == asked  # the same endpoint written with a trailing slash: replayed, not asked again


def test_answer_temperatures_follow_fastchat_unless_set(tmp_path: Path, tiny_causal_model: Path):
    from pipeline.eval import mt_bench
    from tests.support.configs import e2e_config
    from tests.support.configs import write_yaml

    raw = e2e_config(tmp_path, str(tiny_causal_model))
    raw["eval"]["generation"] = {"max_new_tokens": 8}
    config = load_config(write_yaml(tmp_path / "c.yaml", raw), env={})
    writing, math_ = mt_bench.answer_decoding(config, "writing"), mt_bench.answer_decoding(config, "math")
    assert writing.do_sample and writing.temperature == 0.7 and writing.max_new_tokens == 8
    assert not math_.do_sample and mt_bench.answer_decoding(config, "stem").temperature == 0.1
    raw["eval"]["generation"] = {"max_new_tokens": 8, "temperature": 0.3, "do_sample": True}
    config = load_config(write_yaml(tmp_path / "c.yaml", raw), env={})
    assert mt_bench.answer_decoding(config, "math").temperature == 0.3


# --- through `loraforge eval` -------------------------------------------------------------------

SECRET = "sk-loraforge-test-3f9c1e7a2b"


def instruct_config(tmp: Path, model: str, judge: dict, suites: list[str]) -> dict:
    from tests.support.configs import head_jsonl

    return {
        "name": "judge-test",
        "model": {"name_or_path": model},
        "data": {"kind": "instruction", "train_path": str(head_jsonl("alpaca/train.jsonl", tmp / "train.jsonl", 8)),
                 "eval_path": str(head_jsonl("alpaca/seed_tasks.jsonl", tmp / "seed.jsonl", 4)),
                 "instruction_field": "instruction", "input_field": "input", "response_field": "output"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "eval": {"suites": suites, "generation": {"max_new_tokens": 6, "batch_size": 4}},
        "judge": {"cache_dir": str(tmp / "judge-cache"), "backoff_s": 0.05, "timeout_s": 5, **judge},
        "tracking": {"tracking_uri": f"sqlite:///{tmp / 'mlruns.db'}", "experiment_name": "judge-tests",
                     "registered_model_name": "judge-test-lora"},
        "ray": {"storage_path": str(tmp / "ray_results"), "num_cpus": 2, "warm_workers": False},
    }


@pytest.mark.slow
def test_loraforge_eval_judges_every_mode_and_the_key_reaches_nothing(tmp_path: Path, tiny_causal_model: Path,
                                                                      monkeypatch, caplog):
    import logging

    from typer.testing import CliRunner

    from pipeline import tracking
    from pipeline.cli import app
    from pipeline.eval import stage
    from tests.support.configs import write_yaml
    from tests.support.configs import save_adapter

    monkeypatch.setenv("JUDGE_TEST_KEY", SECRET + "\n")  # read from a file, newline and all: sent and masked without it
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.DEBUG)  # the SDK's and httpx's debug lines too
    fake = FakeJudge(api_key=SECRET, faults={2: "429", 4: "500"}, retry_after="0.2")
    with serve(fake) as url:
        # 101-103 (reasoning): FastChat's math prompts with the reference, which side-by-side grades as a third model
        judge = {"base_url": url, "model": fake.model, "api_key_env": "JUDGE_TEST_KEY", "question_ids": [101, 102, 103],
                 "max_failed_fraction": 0.5, "price_prompt_per_1m": 2.5, "price_completion_per_1m": 10.0,
                 "side_by_side": [{"name": "gpt-4", "path": "mt_bench/reference_answer/gpt-4.jsonl"}],
                 "side_by_side_models": ["base", "candidate"]}
        raw = instruct_config(tmp_path, str(tiny_causal_model), judge,
                              ["judge_single", "judge_pairwise", "judge_side_by_side"])
        config_path = write_yaml(tmp_path / "c.yaml", raw)
        adapter = save_adapter(load_config(config_path, env={}), tmp_path / "adapter")
        out = tmp_path / "results.json"
        result = CliRunner().invoke(app, ["eval", str(config_path), "--model", str(adapter), "--json", str(out),
                                          "--reports-dir", str(tmp_path / "reports")])
        assert result.exit_code == 0, result.output
        assert all({k.lower(): v for k, v in h.items()}["authorization"] == f"Bearer {SECRET}" for h in fake.headers)
    results = json.loads(out.read_text())
    stage.validate(results)
    judged = [it for it in results["items"] if it["suite"].startswith("judge_")]
    assert len([i for i in judged if i["mode"] == "single"]) == 3 * 2 * 2  # questions x turns x models
    assert len([i for i in judged if i["mode"] == "pairwise"]) == 3 * 2
    assert len([i for i in judged if i["mode"] == "side_by_side"]) == 3 * 3
    for item in judged:
        assert {"question_id", "turn", "model", "mode", "score", "status"} <= set(item)
        assert item["status"] == "scored" and item["score"] is not None
    assert set(results["suites"]["judge_side_by_side"]) == {"base", "candidate", "ref:gpt-4"}
    # every judge metric with its bootstrap interval over questions; pairwise with its length-controlled win rate
    single = results["suites"]["judge_single"]["candidate"]
    assert single["score_mean_low"] <= single["score_mean"] <= single["score_mean_high"]
    assert "items_low" not in single and "score_mean_turn2_low" in single
    pairwise = results["suites"]["judge_pairwise"]["candidate"]
    assert pairwise["win_rate_adjusted_low"] <= pairwise["win_rate_adjusted"] <= pairwise["win_rate_adjusted_high"]
    assert 0 <= pairwise["win_rate_lc"] <= 1 and "win_rate_lc_low" in pairwise
    assert pairwise["swap_inconsistency"] == pytest.approx(1 - pairwise["consistency"])
    pair_items = [it for it in results["items"] if it["suite"] == "judge_pairwise"]
    for role, key in (("candidate", "length_candidate"), ("base", "length_opponent")):
        # the answer's characters at the judged turn (the tiny model's 6 new tokens may decode to nothing)
        assert [it[key] for it in pair_items] == [len(results["answers"][role][str(it["question_id"])][it["turn"] - 1])
                                                  for it in pair_items]
        assert pairwise[f"mean_{key}"] == pytest.approx(sum(it[key] for it in pair_items) / len(pair_items))
    assert set(results["answers"]) == {"candidate", "base"} and len(results["answers"]["base"]["101"]) == 2
    usage = results["judge"]
    assert usage["calibration"] is None  # no `loraforge judge calibrate` run of this judge in the store
    assert usage["retries"] == 2 and usage["requests"] == len(fake.requests)
    assert usage["cost_usd"] == pytest.approx((usage["prompt_tokens"] * 2.5 + usage["completion_tokens"] * 10) / 1e6)

    client = tracking.client(f"sqlite:///{tmp_path / 'mlruns.db'}")
    run = client.search_runs([client.get_experiment_by_name("judge-tests").experiment_id])[0]
    metrics = run.data.metrics
    assert metrics["judge.single.candidate.score_mean"] == pytest.approx(
        results["suites"]["judge_single"]["candidate"]["score_mean"])
    assert {"judge.single.base.unparseable", "judge.pairwise.candidate.win_rate_adjusted",
            "judge.pairwise.candidate.win_rate_adjusted_low", "judge.pairwise.candidate.win_rate_lc",
            "judge.single.candidate.score_mean_high",
            "judge.pairwise.candidate.consistency", "judge.side_by_side.ref_gpt-4.score_mean", "judge.requests",
            "judge.cost_usd", "judge.prompt_tokens"} <= set(metrics)
    artifacts = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "downloaded")))
    single_file = artifacts / "fastchat/model_judgment/gpt-4o-fake_single.jsonl"
    rows = [json.loads(line) for line in single_file.read_text().splitlines()]
    assert len(rows) == 12 and {r["judge"][1] for r in rows} == {"single-math-v1", "single-math-v1-multi-turn"}
    pair_rows = [json.loads(line) for line in (single_file.parent / "gpt-4o-fake_pair.jsonl").read_text().splitlines()]
    assert {r["g1_winner"] for r in pair_rows} <= {"model_1", "model_2", "tie"}
    assert (artifacts / "fastchat/model_answer/candidate.jsonl").is_file()
    # FastChat's own show_result.py reads them to the same means and rates
    shown = subprocess.run([sys.executable, "-m", "fastchat.llm_judge.show_result", "--mode", "single",
                            "--input-file", str(single_file)], capture_output=True, text=True, check=True).stdout
    average = shown.split("Average")[1]
    for role in ("candidate", "base"):
        mean = results["suites"]["judge_single"][role]["score_mean"]
        line = next(line for line in average.splitlines() if line.startswith(role))
        assert float(line.split()[1]) == pytest.approx(mean, abs=1e-5), shown
    shown = subprocess.run([sys.executable, "-m", "fastchat.llm_judge.show_result", "--mode", "pairwise-all",
                            "--input-file", str(single_file.parent / "gpt-4o-fake_pair.jsonl")],
                           capture_output=True, text=True, check=True).stdout
    line = next(line for line in shown.splitlines() if line.startswith("candidate"))
    assert float(line.split()[-1]) == pytest.approx(
        results["suites"]["judge_pairwise"]["candidate"]["win_rate_adjusted"], abs=1e-5), shown
    assert "Assistant" in (artifacts / "items/judge_single.jsonl").read_text()  # the full judge text
    for picture in ("scores_judge_single.png", "categories_judge_single.png", "verdicts_judge_pairwise.png"):
        assert (tmp_path / "reports" / picture).stat().st_size > 1000

    # the key is nowhere: MLflow store, artifacts, reports, results, cache, captured logs and output
    leaks = [str(p) for p in tmp_path.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert leaks == []
    assert SECRET not in caplog.text and SECRET not in result.output


@pytest.mark.slow
def test_a_judge_outage_fails_loraforge_eval_with_exit_1_and_keeps_every_item(tmp_path: Path, tiny_causal_model: Path,
                                                                              monkeypatch):
    """More unscored items than judge.max_failed_fraction: the mode is failed, the command exits 1, results stay."""
    from typer.testing import CliRunner

    from pipeline import tracking
    from pipeline.cli import app
    from pipeline.eval import stage
    from tests.support.configs import write_yaml
    from tests.support.configs import save_adapter

    monkeypatch.chdir(tmp_path)
    fake = FakeJudge(faults={1: "500"})  # the first request fails; from the third on, the judge is down
    with serve(fake) as url:
        judge = {"base_url": url, "model": fake.model, "question_ids": [81, 82], "turns": 1, "max_retries": 0,
                 "max_failed_fraction": 0.25}
        raw = instruct_config(tmp_path, str(tiny_causal_model), judge, ["judge_single"])
        config_path = write_yaml(tmp_path / "c.yaml", raw)
        adapter = save_adapter(load_config(config_path, env={}), tmp_path / "adapter")
        fake.always_fail = "[Question]"  # every single-answer prompt from now on (the probe lists models)
        out = tmp_path / "results.json"
        result = CliRunner().invoke(app, ["eval", str(config_path), "--model", str(adapter), "--json", str(out),
                                          "--reports-dir", str(tmp_path / "reports")])
    assert result.exit_code == 1, result.output
    assert "judge_single" in result.output and "not scored" in result.output, result.output
    results = json.loads(out.read_text())
    stage.validate(results)
    items = [it for it in results["items"] if it["suite"] == "judge_single"]
    assert len(items) == 2 * 2 and {it["status"] for it in items} == {"failed"}  # questions x models, none lost
    assert all("HTTP 500" in it["reason"] for it in items)
    assert "over judge.max_failed_fraction=0.25" in results["failed"]["judge_single"]
    client = tracking.client(f"sqlite:///{tmp_path / 'mlruns.db'}")
    runs = client.search_runs([client.get_experiment_by_name("judge-tests").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FAILED"


BAD_JUDGE = [
    ("unreachable", {"base_url": "http://127.0.0.1:9/v1"}, [], "judge.base_url: cannot list models"),
    ("not served", {"model": "gpt-5-nope"}, [], "judge.model: 'gpt-5-nope' is not served"),
    ("key unset", {"api_key_env": "LORAFORGE_NO_SUCH_KEY"}, [], "judge.api_key_env: the environment variable "
                                                                 "LORAFORGE_NO_SUCH_KEY is not set"),
    ("key with a space", {"api_key_env": "LORAFORGE_SPACED_KEY"}, [], "judge.api_key_env: the value of "
                                                                      "LORAFORGE_SPACED_KEY holds spaces"),
    ("unknown mode", {}, ["--suite", "judge_bogus"], "unknown suite 'judge_bogus'"),
    ("no champion", {"pairwise_against": "champion"}, ["--suite", "judge_pairwise"],
     "judge.pairwise_against: champion, but models:/judge-test-lora@champion does not exist"),
    ("bad questions", {"questions_path": "QUESTIONS"}, [], "judge.questions_path:"),
    ("bad references", {"reference_path": "REFERENCES"}, [], "judge.reference_path:"),
]


@pytest.mark.parametrize("case, judge, args, expected", BAD_JUDGE, ids=[b[0] for b in BAD_JUDGE])
def test_bad_judge_input_exits_2_before_any_generation(case, judge, args, expected, tmp_path: Path,
                                                       tiny_causal_model: Path, monkeypatch):
    from typer.testing import CliRunner

    from pipeline.cli import app
    from pipeline.eval import stage
    from tests.support.configs import write_yaml

    def no_generation(*a, **k):
        raise AssertionError("generation started")

    monkeypatch.setattr(stage, "_gather", no_generation)
    monkeypatch.setenv("LORAFORGE_SPACED_KEY", "sk-pasted twice sk-pasted\n")
    (tmp_path / "q.jsonl").write_text('{"question_id": 1, "turns": ["fine"]}\n{"question_id": 2, "turns": "not a list"}\n')
    (tmp_path / "r.jsonl").write_text('{"question_id": 1, "choices": [{"turns": ["ok"]}]}\nnot json\n')
    judge = {k: {"QUESTIONS": str(tmp_path / "q.jsonl"), "REFERENCES": str(tmp_path / "r.jsonl")}.get(v, v)
             for k, v in judge.items()}
    from tests.support.configs import e2e_config, save_adapter

    adapter = save_adapter(load_config(write_yaml(tmp_path / "a.yaml", e2e_config(tmp_path, str(tiny_causal_model))),
                                       env={}), tmp_path / "adapter")
    with serve(FakeJudge()) as url:
        raw = instruct_config(tmp_path, str(tiny_causal_model),
                              {"base_url": url, "model": "gpt-4o-fake", "question_ids": None, **judge},
                              ["judge_single", "judge_pairwise"])
        raw["judge"].pop("question_ids")
        result = CliRunner().invoke(app, ["eval", str(write_yaml(tmp_path / "c.yaml", raw)), *args,
                                          "--model", str(adapter)])
    assert result.exit_code == 2, result.output
    assert expected in " ".join(result.output.split()), result.output
    if case == "bad questions":
        assert "q.jsonl:2: needs `turns`" in result.output
    if case == "bad references":
        assert "r.jsonl:2: not JSON" in result.output


@pytest.mark.slow
def test_the_offline_default_judge_rates_every_item_on_loopback(tmp_path: Path, tiny_causal_model: Path):
    """The rater (pipeline/eval/judge/rater.py) on the tiny model: every item scored, in the judge's format, with a
    probability-weighted score over the scale; FastChat's pairwise verdict too; stopped with the stage."""
    import socket

    from pipeline.eval.judge import stage as judge_stage
    from tests.support.configs import write_yaml

    # timeout_s 60: the first request to a fresh server on a loaded 2-core machine took over the helper's 5 s
    raw = instruct_config(tmp_path, str(tiny_causal_model), {"question_ids": [81, 82], "turns": 2, "timeout_s": 60},
                          ["judge_single"])
    config = load_config(write_yaml(tmp_path / "c.yaml", raw), env={})
    assert config.judge.base_url is None
    with judge_stage.session(config) as judge:
        port = int(judge.endpoint.base_url.rsplit(":", 1)[1].split("/")[0])
        assert judge.endpoint.base_url.startswith("http://127.0.0.1:")
        assert judge.endpoint.judge_id.startswith("local:sha256:") and "/" not in judge.endpoint.judge_id
        assert judge.endpoint.judge_id.endswith(":constrained-v1")
        questions = inputs.load_questions(config.judge)
        judge_prompts = inputs.load_judge_prompts(config.judge)
        items = grading.single(judge.client, judge_prompts, questions, answers_for(questions, "candidate"), {})
        pairs = grading.pairwise(judge.client, judge_prompts, questions, answers_for(questions, "candidate", "base"),
                                 {}, "base")
        usage = judge.client.usage
    assert len(items) == 4 and {it["status"] for it in items} == {"scored"}
    for item in items:
        assert item["judgment"] == f"Rating: [[{item['score']:g}]]" and 1 <= item["score"] <= 10
        assert 1 <= item["weighted_score"] <= 10 and item["weighted_score"] != item["score"]
    assert {it["status"] for it in pairs} == {"scored"}
    assert all(it[g]["judgment"] in ("[[A]]", "[[B]]", "[[C]]") for it in pairs for g in ("g1", "g2"))
    assert usage.prompt_tokens > 300 and usage.completion_tokens > 0 and usage.failed == 0
    with socket.socket() as sock:  # stopped with the stage
        assert sock.connect_ex(("127.0.0.1", port)) != 0


def test_run_probes_a_remote_judge_before_training(tmp_path: Path, tiny_causal_model: Path, monkeypatch):
    from pipeline import preflight
    from tests.support.configs import write_yaml

    raw = instruct_config(tmp_path, str(tiny_causal_model), {"base_url": "http://127.0.0.1:9/v1", "model": "m",
                                                             "api_key_env": "LORAFORGE_UNSET_KEY_VAR"},
                          ["perplexity", "judge_single"])
    config = load_config(write_yaml(tmp_path / "c.yaml", raw), env={})
    problems = preflight.check_suites(config)
    assert problems == ["judge.api_key_env: the environment variable LORAFORGE_UNSET_KEY_VAR is not set; export "
                        "LORAFORGE_UNSET_KEY_VAR=<key> (the key never goes in the config)"]
    monkeypatch.setenv("LORAFORGE_UNSET_KEY_VAR", "k")
    assert preflight.check_suites(config)[0].startswith("judge.base_url: cannot list models at http://127.0.0.1:9/v1")
