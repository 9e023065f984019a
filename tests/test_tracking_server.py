"""A real tracking server: PostgreSQL backend, basic-auth, artifacts served over HTTP; a sweep as a non-admin user."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline import tracking
from pipeline.cli import app
from tests.support.configs import minilm_config, write_yaml
from tests.support.mlflow_service import env

pytestmark = pytest.mark.slow


def server_config(tmp_path: Path, sst2_small, server, experiment: str, model: str, **sections) -> Path:
    raw = minilm_config(tmp_path, sst2_small, **sections)
    raw["tracking"] = {"tracking_uri": server.uri, "experiment_name": experiment, "registered_model_name": model,
                       "system_metrics_interval_s": 0}
    return write_yaml(tmp_path / "c.yaml", raw)


def test_sweep_over_http_as_a_non_admin_user_survives_the_server_dying(tmp_path: Path, sst2_small, mlflow_server):
    """alice sweeps over HTTP; the server is SIGKILLed mid-training and restarted; every write lands once."""
    import os
    import threading
    import time

    import ray

    from pipeline import outbox
    from pipeline.config import load_config
    from pipeline.run import run_pipeline

    mlflow_server.create_user("alice", "alice-password-1")
    # 3 epochs x 10 steps: train_loss every 2 steps, an evaluation every 5
    config = load_config(server_config(tmp_path, sst2_small, mlflow_server, "alice-sweeps", "alice-lora",
                                       train={"epochs": 3}), env={})
    outage: dict[str, float] = {}

    def kill_when_training_is_tracked() -> None:
        """SIGKILL the server once the trial's first metrics are on it; start it again 10 s later."""
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                experiment = mlflow_server.rest("/api/2.0/mlflow/experiments/get-by-name?experiment_name=alice-sweeps")
                runs = mlflow_server.rest("/api/2.0/mlflow/runs/search", {
                    "experiment_ids": [experiment["experiment"]["experiment_id"]],
                    "filter": "tags.`loraforge.kind` = 'trial'"}).get("runs", [])
                if runs and mlflow_server.rest(f"/api/2.0/mlflow/metrics/get-history?run_id="
                                               f"{runs[0]['info']['run_id']}&metric_key=train_loss").get("metrics"):
                    break
            except OSError:  # the experiment does not exist yet
                pass
            time.sleep(0.5)
        mlflow_server.kill()
        outage["down"] = time.monotonic()
        time.sleep(10)
        mlflow_server.start()
        outage["up"] = time.monotonic()

    killer = threading.Thread(target=kill_when_training_is_tracked, daemon=True)
    if ray.is_initialized():
        ray.shutdown()
    # Ray's workers inherit the credentials (and the outbox folder) from the driver's environment
    with env({"MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": "alice-password-1"}):
        killer.start()
        try:
            result = run_pipeline(config)
        finally:
            ray.shutdown()
            os.environ.pop(outbox.ENV_VAR, None)
        killer.join(120)
        client = tracking.client(mlflow_server.uri)
        version = client.get_model_version_by_alias("alice-lora", "candidate")
        adapter = tracking.fetch_adapter("models:/alice-lora@candidate", mlflow_server.uri, tmp_path / "dl")
    assert "down" in outage and "up" in outage, "the server was never killed"
    # writes were queued while it was down and replayed (by the worker itself or by the driver at the end)
    box = outbox.Outbox(config.ray.storage_path / "mlflow_outbox")
    assert box.sent_total() > 0 and box.pending() == 0
    assert version.run_id == result.sweep.best.run_id
    assert (adapter / "adapter_model.safetensors").is_file()

    with env(mlflow_server.admin()):
        admin = tracking.raw_client(mlflow_server.uri)
        experiment = admin.get_experiment_by_name("alice-sweeps")
        runs = admin.search_runs([experiment.experiment_id])
        trial = admin.get_run(result.sweep.best.run_id)
        losses = admin.get_metric_history(trial.info.run_id, "train_loss")
        evals = admin.get_metric_history(trial.info.run_id, "eval_accuracy")
        artifacts = {a.path for a in admin.list_artifacts(trial.info.run_id)}
        versions = admin.search_model_versions("name = 'alice-lora'")
        parent = admin.get_run(result.parent_run_id)
    # every logged point exactly once: the ones sent live and the ones replayed from the outbox
    assert sorted(m.step for m in losses) == list(range(2, 31, 2))
    assert sorted(m.step for m in evals) == [5, 10, 15, 20, 25, 30]
    assert trial.data.params["lora.r"] == "4" and trial.data.params["trainable_params"]
    assert trial.data.metrics["best_eval_accuracy"] == pytest.approx(result.sweep.best.best_metric)
    assert trial.info.status == "FINISHED" and parent.info.status == "FINISHED"
    assert {"adapter", "config.yaml"} <= artifacts
    assert len(versions) == 1
    assert experiment.artifact_location.startswith("mlflow-artifacts:")  # served by the server, not a local path
    assert {r.data.tags.get("loraforge.kind") for r in runs} >= {"sweep", "trial"}
    # the files went through the server into its artifact destination
    stored = {p.name for p in mlflow_server.artifacts.rglob("*") if p.is_file()}
    assert {"adapter_model.safetensors", "MLmodel", "config.yaml", "report.md"} <= stored


def test_an_outbox_replayed_twice_into_the_server_lands_once(tmp_path: Path, mlflow_server, monkeypatch):
    """The duplicate replay against what the outbox exists for: the HTTP server with PostgreSQL behind it."""
    from pipeline import outbox
    from tests.support.outbox_replay import assert_landed_once, queue_writes, replay_twice

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with env(mlflow_server.admin()):
        server = tracking.raw_client(mlflow_server.uri)
        run_id = server.create_run(server.create_experiment("outbox-replay")).info.run_id
        box = outbox.Outbox(tmp_path / "outbox")
        assert queue_writes(box, run_id, tmp_path) == box.pending() == 5
        assert replay_twice(box, server) == [(5, 0), (5, 0), (0, 0)]
        assert_landed_once(server, run_id)


def test_bad_credentials_and_missing_permissions_exit_2_naming_the_fix(tmp_path: Path, sst2_small, mlflow_server):
    mlflow_server.create_user("bob", "bob-password-12")
    mlflow_server.create_user("carol", "carol-password-1")
    with env({"MLFLOW_TRACKING_USERNAME": "carol", "MLFLOW_TRACKING_PASSWORD": "carol-password-1"}):
        carol = tracking.client(mlflow_server.uri)
        experiment_id = carol.create_experiment("carol-sweeps")
        carol.create_registered_model("carol-lora")
    runner = CliRunner()

    def run(user: str | None, password: str | None, experiment: str, model: str, name: str) -> str:
        (tmp_path / name).mkdir()
        path = server_config(tmp_path / name, sst2_small, mlflow_server, experiment, model)
        with env({"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": password}):
            out = runner.invoke(app, ["run", str(path), "--reports-dir", str(tmp_path / name / "reports")])
        assert out.exit_code == 2, out.output
        assert "Traceback" not in out.output
        assert not (tmp_path / name / "ray_results").exists()  # nothing started
        return " ".join(out.output.split())

    assert "set MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD" in run(None, None, "x", "y", "anon")
    assert "rejected the credentials of user 'bob'" in run("bob", "wrong-password", "x", "y", "wrong")
    out = run("bob", "bob-password-12", "carol-sweeps", "bob-lora", "noread")
    assert "user 'bob' has no READ permission on experiment 'carol-sweeps'" in out
    mlflow_server.grant_experiment(experiment_id, "bob", "READ")
    out = run("bob", "bob-password-12", "carol-sweeps", "bob-lora", "readonly")
    assert "user 'bob' lacks EDIT permission on experiment 'carol-sweeps'" in out
    out = run("bob", "bob-password-12", "bob-sweeps", "carol-lora", "model")
    assert "user 'bob' has no READ permission on registered model 'carol-lora'" in out
