"""The whole pipeline through real Ray Tune + Ray Train, real PEFT on MiniLM, a real MLflow SQLite store."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline import tracking
from pipeline.config import load_config
from pipeline.eval.stage import validate
from pipeline.run import run_pipeline
from tests.support.configs import minilm_config, write_yaml

pytestmark = pytest.mark.slow


def test_sweep_registers_winner_that_plain_peft_reloads(tmp_path: Path, sst2_small, sst2_sweep):
    # the session's 4-trial ASHA sweep (tests/conftest.py), also read by tests/test_registry.py
    config, _, result, sweep_dir, version = sst2_sweep
    client = tracking.client(config.tracking.tracking_uri)
    experiment = client.get_experiment_by_name("tests")
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["sweep.trials"] == "4"
    children = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'")
    assert len(children) == 4
    seen = set()
    for child in children:
        params = child.data.params
        seen.add((params["lora.r"], params["lora.target_modules"]))
        # our trainable-parameter count is PEFT's own count
        assert params["trainable_params"] == params["peft_trainable_params"]
        assert child.info.status == "FINISHED"
        losses = client.get_metric_history(child.info.run_id, "train_loss")
        assert len(losses) >= 2 and all(torch.isfinite(torch.tensor(m.value)) for m in losses)
        assert client.get_metric_history(child.info.run_id, "eval_accuracy")
    assert seen == {("2", "query+value"), ("4", "query+value"),
                    ("2", "query+key+value+attention.output.dense"), ("4", "query+key+value+attention.output.dense")}
    # r=2 trains fewer parameters than r=4 on the same targets
    counts = {(c.data.params["lora.r"], c.data.params["lora.target_modules"]): int(c.data.params["trainable_params"]) for c in children}
    assert counts[("2", "query+value")] < counts[("4", "query+value")]

    assert version.run_id == result.sweep.best.run_id and version.status == "READY"
    # the wall clock covers the training steps, the evaluations and what the loop does around them
    last = result.sweep.best.last_result
    assert last["loop_wall_s"] > last["train_time_s"] + last["eval_time_s"] > 0
    assert 0 < last["wall_tokens_per_s"] < last["tokens_per_s"]
    best_reported = result.sweep.best.best_metric
    assert result.eval_metrics["eval_accuracy"] == pytest.approx(best_reported, abs=1e-9)
    assert float(version.tags["eval.accuracy"]) == pytest.approx(best_reported, abs=1e-6)
    assert (sweep_dir / "reports" / "report.md").read_text().count("trial_") >= 4
    assert (sweep_dir / "reports" / "learning_curves.png").stat().st_size > 1000
    artifacts = {a.path for a in client.list_artifacts(result.parent_run_id, "report")}
    assert {"report/report.md", "report/learning_curves.png", "report/metric_vs_rank.png",
            "report/rank_targets_heatmap.png"} <= artifacts

    # the run ends with the benchmark stage on the registered version: candidate vs base
    stage = result.evaluation.results
    validate(stage)
    assert stage["model_ref"] == f"models:/test-sst2-lora/{version.version}"
    assert stage["model_version"] == str(version.version)
    scores = stage["suites"]["classification"]
    assert scores["candidate"]["accuracy"] == pytest.approx(result.eval_metrics["eval_accuracy"], abs=1e-9)
    assert set(scores["candidate"]) == {"accuracy", "f1_macro", "f1", "mcc"}
    # the base's classifier head is untrained: the adapter (which carries the head) must beat it
    assert scores["candidate"]["accuracy"] > scores["base"]["accuracy"]
    version = client.get_model_version(version.name, version.version)
    assert float(version.tags["eval.classification.accuracy"]) == pytest.approx(scores["candidate"]["accuracy"], abs=1e-6)
    eval_run = client.get_run(version.tags["loraforge.eval_run_id"])
    assert eval_run.data.metrics["candidate_classification_accuracy"] == pytest.approx(scores["candidate"]["accuracy"])
    assert eval_run.data.tags["loraforge.eval.model_version"] == str(version.version)
    assert {"items", "report", "results.json"} <= {a.path for a in client.list_artifacts(eval_run.info.run_id)}
    assert len([i for i in stage["items"] if i["model"] == "base"]) == 64
    assert (sweep_dir / "reports" / "eval_report.md").is_file()
    assert (sweep_dir / "reports" / "rank_targets_heatmap.png").stat().st_size > 1000

    # a user who knows only the URI: download, then plain transformers + peft
    import json

    import mlflow
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    # the version is an MLflow Model; its PEFT folder is at the documented subpath
    with tracking.process_uri(config.tracking.tracking_uri):  # what mlflow.set_tracking_uri(uri) does for a user
        model_dir = Path(mlflow.artifacts.download_artifacts(artifact_uri=result.model_uri, dst_path=str(tmp_path / "dl")))
    adapter_dir = model_dir / "artifacts" / "adapter"
    assert (model_dir / "MLmodel").is_file()
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in adapter_dir.iterdir()}
    base = AutoModelForSequenceClassification.from_pretrained(config.model.resolve(), num_labels=2)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    tokenizer = AutoTokenizer.from_pretrained(config.model.resolve())
    rows = [json.loads(line) for line in sst2_small["eval"].read_text().splitlines()]
    correct = 0
    with torch.no_grad():
        for row in rows:
            enc = tokenizer(row["sentence"], truncation=True, max_length=64, return_tensors="pt")
            correct += int(model(**enc).logits.argmax(-1).item() == row["label"])
    assert correct / len(rows) == pytest.approx(result.eval_metrics["eval_accuracy"], abs=1e-9)

    # export straight from the registry, by alias (the default) and by version
    from pipeline import export

    for uri, out in ((None, tmp_path / "merged-alias"), (f"models:/test-sst2-lora/{version.version}", tmp_path / "merged-v")):
        merged = export.merge_registered(config, uri, out)
        assert merged.max_abs_diff < 1e-4 and (out / "model.safetensors").is_file()


def test_time_budget_stops_the_sweep_and_keeps_the_best_checkpoint(tmp_path: Path, sst2_small, ray_local):
    raw = minilm_config(
        tmp_path, sst2_small,
        # the budget covers worker start-up too (about 30 s on 2 busy cores): 60 s leaves room for evals
        train={"epochs": 40, "eval_every_steps": 3},
        sweep={"searcher": "grid", "scheduler": "fifo", "time_budget_s": 60,
               "parameters": {"lora.r": {"grid": [2, 4]}}},
    )
    config = load_config(write_yaml(tmp_path / "c.yaml", raw), env={})
    result = run_pipeline(config)
    assert result.sweep.wall_s < 150
    statuses = {t.status for t in result.sweep.trials}
    assert "BUDGET" in statuses
    client = tracking.client(config.tracking.tracking_uri)
    for trial in result.sweep.trials:
        run = client.get_run(trial.run_id)
        assert run.info.status in ("FINISHED", "KILLED")  # no run left RUNNING
        if trial.best_checkpoint:
            assert any(a.path == "adapter" for a in client.list_artifacts(trial.run_id))
    version = client.get_model_version_by_alias("test-sst2-lora", "candidate")
    assert version.run_id == result.sweep.best.run_id
    assert result.eval_metrics["eval_accuracy"] == pytest.approx(result.sweep.best.best_metric, abs=1e-9)
