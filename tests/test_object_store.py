"""An object store on loopback (moto's S3 server): a sweep whose checkpoints and Tune state are in a bucket
(`ray.storage_path=s3://...`), resumed from there, with MLflow artifacts in the same bucket through the
tracking server and the registry loading from it; bad storage URIs named before any work."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline import outbox, tracking
from pipeline.cli import app
from pipeline.config import load_config
from tests.support.configs import minilm_config, write_yaml
from tests.support.mlflow_service import MlflowServer, env, free_port

pytestmark = pytest.mark.slow

BUCKET = "loraforge-artifacts"
AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3():
    """moto's real S3 HTTP server on 127.0.0.1 with one bucket; its endpoint URL."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        boto3.client("s3", endpoint_url=endpoint, **{k.lower(): v for k, v in AWS.items() if k != "AWS_DEFAULT_REGION"},
                     region_name="us-east-1").create_bucket(Bucket=BUCKET)
        yield endpoint
    finally:
        server.stop()


def _client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=AWS["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=AWS["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")


def bucket_keys(endpoint: str, client=None) -> list[str]:
    pages = (client or _client(endpoint)).get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def bucket_objects(endpoint: str) -> dict[str, bytes]:
    client = _client(endpoint)
    return {k: client.get_object(Bucket=BUCKET, Key=k)["Body"].read() for k in bucket_keys(endpoint, client)}


def storage_uri(endpoint: str, prefix: str) -> str:
    """A `ray.storage_path` on the loopback bucket, the endpoint in pyarrow's URI options."""
    return f"s3://{BUCKET}/{prefix}?endpoint_override={endpoint.removeprefix('http://')}&scheme=http"


def test_a_sweep_on_the_bucket_checkpoints_resumes_and_registers_from_it(tmp_path: Path, sst2_small, s3, mlflow_server,
                                                                          monkeypatch):
    """Checkpoints and Tune state on S3 (ray.storage_path), MLflow artifacts in the same bucket through the
    tracking server; `--resume` reads the trials back from the bucket and the registry loads from it."""
    import ray

    from pipeline.run import run_pipeline

    mlflow_server.postgres.create("mlflow_s3", "mlflow_s3_auth")
    server = MlflowServer(mlflow_server.postgres, tmp_path / "server", databases=("mlflow_s3", "mlflow_s3_auth"),
                          artifacts_destination=f"s3://{BUCKET}/mlflow",
                          extra_env={**AWS, "MLFLOW_S3_ENDPOINT_URL": s3})
    server.start()
    # the trials' checkpoints need the bucket's credentials (from the environment, as on a real cluster);
    # MLflow artifacts still go through the server (the experiment's location is mlflow-artifacts:)
    for key, value in AWS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("LORAFORGE_STORAGE_CACHE", str(tmp_path / "cache"))
    try:
        raw = minilm_config(tmp_path, sst2_small, sweep={"parameters": {"lora.r": {"grid": [2, 4]}}})
        raw["name"] = "on-s3"
        raw["ray"]["storage_path"] = storage_uri(s3, "ray")
        raw["tracking"] = {"tracking_uri": server.uri, "experiment_name": "s3-sweeps", "registered_model_name": "s3-lora",
                           "system_metrics_interval_s": 0}
        config = load_config(write_yaml(tmp_path / "c.yaml", raw), env={})
        assert config.ray.storage_path == raw["ray"]["storage_path"]  # kept as written, query and all
        if ray.is_initialized():
            ray.shutdown()
        with env(server.admin()):
            try:
                result = run_pipeline(config)
                after_sweep = bucket_objects(s3)
                # --resume of the finished sweep: Tune restores it from the bucket, every trial is read back
                # from its checkpoints there, and the winner is registered again
                resumed = run_pipeline(config, resume=True)
            finally:
                ray.shutdown()
                os.environ.pop(outbox.ENV_VAR, None)
            adapter = tracking.fetch_adapter("models:/s3-lora@candidate", server.uri, tmp_path / "dl")
            experiment = tracking.raw_client(server.uri).get_experiment_by_name("s3-sweeps")
    finally:
        server.kill()
    assert experiment.artifact_location.startswith("mlflow-artifacts:")
    assert not list(server.artifacts.rglob("*.safetensors"))  # nothing on the server's disk
    assert not (tmp_path / "ray_results").exists()  # nor on this one: checkpoints and Tune state are in the bucket

    keys = list(after_sweep)
    assert any(k.startswith("ray/on-s3/experiment_state-") for k in keys), keys
    assert "ray/on-s3/loraforge_run.json" in keys
    for trial in result.sweep.trials:
        checkpoints = [k for k in keys if k.startswith(f"ray/on-s3/train/train-{trial.trial_id}/checkpoint_")
                       and k.endswith("/adapter_model.safetensors")]
        assert len(checkpoints) >= 1, (trial.trial_id, keys)
    best = result.sweep.best
    assert best.best_checkpoint.startswith(f"{BUCKET}/ray/on-s3/train/train-{best.trial_id}/checkpoint_")
    # the registered version, loaded back through the server, is the bucket's bytes, which are the checkpoint's
    best_bytes = after_sweep[best.best_checkpoint.removeprefix(f"{BUCKET}/") + "/adapter_model.safetensors"]
    in_mlflow = [v for k, v in after_sweep.items() if k.startswith("mlflow/") and k.endswith("artifacts/adapter/adapter_model.safetensors")]
    assert best_bytes in in_mlflow
    names = {Path(k).name for k in after_sweep}
    assert {"adapter_config.json", "MLmodel", "config.yaml", "report.md"} <= names

    assert result.model_version == "1" and resumed.model_version == "2"
    assert {t.trial_id: t.best_metric for t in resumed.sweep.trials} == {t.trial_id: t.best_metric for t in result.sweep.trials}
    assert resumed.sweep.best.best_checkpoint == best.best_checkpoint
    assert (adapter / "adapter_model.safetensors").read_bytes() == best_bytes


def test_storage_uri_problems_are_named_before_any_work(tmp_path: Path, sst2_small, s3, monkeypatch):
    for key, value in AWS.items():
        monkeypatch.setenv(key, value)
    raw = minilm_config(tmp_path, sst2_small)
    cases = {
        "no-such-bucket": (storage_uri(s3, "ray").replace(BUCKET, "no-such-bucket"), {},
                           "the bucket 'no-such-bucket' does not exist"),
        "pbt": (storage_uri(s3, "ray"), {"scheduler": "pbt", "parameters": {"train.lr": {"grid": [1e-3, 3e-3]}}},
                "sweep.scheduler: pbt copies checkpoints between trials on a filesystem"),
        "unreachable": (storage_uri("http://127.0.0.1:9", "ray"), {}, "cannot reach its bucket"),
        "unknown scheme": ("nosuchfs://bucket/x", {}, "pyarrow cannot open nosuchfs:// storage"),
    }
    for name, (uri, sweep, expected) in cases.items():
        raw["ray"]["storage_path"] = uri
        raw["sweep"] = {"searcher": "grid", "scheduler": "fifo", "parameters": {}, **sweep}
        path = write_yaml(tmp_path / f"{name}.yaml", raw)
        assert load_config(path, env={}).ray.storage_path == uri  # not mangled into s3:/...
        result = CliRunner().invoke(app, ["run", str(path)])
        assert result.exit_code == 2, (name, result.output)
        assert expected in result.output and "Traceback" not in result.output, (name, result.output)
    assert not (tmp_path / "mlruns.db").exists()  # refused before MLflow or Ray was touched


def test_a_sweep_killed_mid_trial_resumes_from_the_bucket(tmp_path: Path, sst2_small, s3):
    """The driver SIGKILLed while its second trial trains, checkpoints and Tune state on S3 only:
    `--resume` reads them back from the bucket, keeps the finished trial and continues the other."""
    import signal
    import time

    from tests.support.ray_cluster import stop_every_ray
    from tests.support.driver import loraforge_run, trial_runs

    raw = minilm_config(tmp_path, sst2_small, train={"epochs": 1, "eval_every_steps": 2})
    raw["name"] = "killed-on-s3"
    raw["sweep"] = {"searcher": "grid", "scheduler": "fifo", "max_concurrent_trials": 1, "pack_size": 1,
                    "parameters": {"lora.r": {"grid": [2, 4]}}}
    raw["ray"]["storage_path"] = storage_uri(s3, "killed")
    path = write_yaml(tmp_path / "c.yaml", raw)
    uri = raw["tracking"]["tracking_uri"]
    run_env = {**AWS, "LORAFORGE_STORAGE_CACHE": str(tmp_path / "cache")}

    def manifests() -> list[str]:
        return [k for k in bucket_keys(s3) if k.startswith("killed/killed-on-s3/train/") and k.endswith("/MANIFEST.rank0.json")]

    driver = loraforge_run(str(path), cwd=tmp_path, env=run_env, start_new_session=True)
    deadline, finished, running = time.time() + 400, None, []
    while time.time() < deadline and driver.poll() is None and not running:
        done = [r for r in trial_runs(uri, "tests") if r.data.tags.get("loraforge.trial_status") == "DONE"]
        if done:
            finished = done[0].data.tags["loraforge.trial_id"]
            running = [k for k in manifests() if f"/train-{finished}/" not in k]
        time.sleep(0.2)
    assert running and driver.poll() is None, "the second trial never checkpointed while the driver lived"
    interrupted = running[0].split("/train-")[1].split("/")[0]
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    stop_every_ray()
    finished_objects = {k: v for k, v in bucket_objects(s3).items() if f"/train-{finished}/" in k}

    resumed = loraforge_run(str(path), "--resume", cwd=tmp_path, env=run_env)
    output, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, output[-3000:]
    assert "resuming sweep" in output and "killed-on-s3: 2 trials" in output
    assert not (tmp_path / "ray_results").exists()  # nothing of the sweep on local disk

    runs = trial_runs(uri, "tests")
    assert len(runs) == 2 and {r.data.tags["loraforge.trial_status"] for r in runs} == {"DONE"}
    # the finished trial was not rerun: its objects in the bucket are the same ones
    assert {k: v for k, v in bucket_objects(s3).items() if f"/train-{finished}/" in k} == finished_objects
    continued = next(r for r in runs if r.data.tags["loraforge.trial_id"] == interrupted)
    assert int(continued.data.tags["loraforge.resumed_from_step"]) >= 2  # from its checkpoint in the bucket
    assert tracking.client(uri).get_model_version_by_alias("test-sst2-lora", "candidate").run_id in {
        r.info.run_id for r in runs}


def test_storage_faults_mid_sweep_lose_no_checkpoint_and_a_failed_registration_aliases_nothing(
        tmp_path: Path, sst2_small, s3, monkeypatch):
    """Through a fault proxy in front of the bucket (tests/support/s3_faults.py):
    F18 + F3: the bucket drops every request for 8 s, starting at the third checkpoint's train state, and
    every later upload into that checkpoint, so it is cut off mid-upload; the worker fails, Train restarts it from the previous one and
    the trial finishes, every checkpoint the run kept whole.
    F12: S3 denies the first upload of the winner's MLflow Model: registration fails with a named error,
    no version exists, nothing is aliased; `--resume` then registers exactly one READY version whose
    adapter is the checkpoint's bytes."""
    import ray

    from pipeline import checkpoint as ckpt
    from pipeline.run import run_pipeline
    from pipeline.sweep import SweepError
    from tests.support.s3_faults import ACCESS_DENIED, S3FaultProxy

    outage_s, state = 8.0, {"dirs": [], "outage_from": None, "denied": 0}

    def decide(method: str, path: str):
        import time

        now = time.monotonic()
        if state["outage_from"] is not None and now - state["outage_from"] < outage_s:
            return "drop"
        key = path.split("?")[0]  # pyarrow uploads in multipart requests: the key, then the part's query
        if method in ("PUT", "POST") and state.get("cut") and f"/checkpoint_{state['cut']}/" in key:
            # the cut checkpoint never lands, however long the client retries: a loaded machine's retries
            # once outlasted the 8 s outage, the upload went through and no worker failed
            return "drop"
        if method in ("PUT", "POST") and "/checkpoint_" in key and state["outage_from"] is None:
            folder, _, rest = key.split("/checkpoint_")[1].partition("/")
            if rest and folder not in state["dirs"]:  # a file in a checkpoint folder, not Train's snapshot
                state["dirs"].append(folder)
            if len(state["dirs"]) == 3 and key.endswith(ckpt.state_file(0)):
                state["outage_from"], state["cut"] = now, folder
                return "drop"
        if method == "PUT" and "/faults-mlflow/" in path and "/models/" in path and not state["denied"]:
            state["denied"] += 1
            return ACCESS_DENIED
        return None

    for key, value in AWS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("LORAFORGE_STORAGE_CACHE", str(tmp_path / "cache"))
    with S3FaultProxy(s3, decide) as proxy:
        monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", proxy.endpoint)  # boto3, for MLflow's artifacts
        raw = minilm_config(tmp_path, sst2_small, train={"epochs": 3, "eval_every_steps": 2, "max_failures": 3})
        raw["name"] = "faults"
        raw["ray"]["storage_path"] = storage_uri(proxy.endpoint, "faults-ray")
        raw["tracking"].update({"experiment_name": "s3-faults", "registered_model_name": "faults-lora"})
        config = load_config(write_yaml(tmp_path / "c.yaml", raw), env={})
        # the experiment's artifacts in the bucket too, as a team's server would put them
        client = tracking.raw_client(config.tracking.tracking_uri)
        client.create_experiment("s3-faults", artifact_location=f"s3://{BUCKET}/faults-mlflow")
        if ray.is_initialized():
            ray.shutdown()
        try:
            with pytest.raises(SweepError) as failed:
                run_pipeline(config)
            stored = bucket_objects(s3)
            resumed = run_pipeline(config, resume=True)
            adapter = tracking.fetch_adapter("models:/faults-lora@candidate", config.tracking.tracking_uri,
                                             tmp_path / "dl")
        finally:
            ray.shutdown()

    assert state["outage_from"] is not None and proxy.seen("drop"), \
        ("the outage never started", [e for e in proxy.log if "checkpoint_" in e[1]][:20])
    assert state["denied"] == 1
    message = str(failed.value)
    assert "registering the winner" in message and "AccessDenied" in message and "--resume" in message

    # the trial finished after the outage, restarted from the checkpoint before the cut one
    client = tracking.client(config.tracking.tracking_uri)
    experiment = client.get_experiment_by_name("s3-faults")
    [trial_run] = client.search_runs([experiment.experiment_id], "tags.`loraforge.trial_id` != ''")
    tags = trial_run.data.tags
    assert int(tags.get("loraforge.worker_restarts", 0)) >= 1, (state, {k: v[:300] for k, v in tags.items()})
    assert int(tags["loraforge.resumed_from_step"]) in (2, 4)  # not the cut one (6), not scratch
    # every checkpoint Train's snapshot keeps is whole in the bucket; the cut one is not among them
    [snapshot_key] = [k for k in stored if k.startswith("faults-ray/faults/train/") and k.endswith(ckpt.TRAIN_SNAPSHOT)]
    import json

    kept = [r["checkpoint_dir_name"] for r in json.loads(stored[snapshot_key])["checkpoint_results"]]
    assert kept and f"checkpoint_{state['cut']}" not in kept
    run_prefix = snapshot_key.rsplit("/", 1)[0]
    for name in kept:
        files = {k.rsplit("/", 1)[1]: v for k, v in stored.items()
                 if k.startswith(f"{run_prefix}/{name}/") and not k.endswith("/")}  # not pyarrow's folder markers
        local = tmp_path / "verify" / name
        local.mkdir(parents=True)
        for file, data in files.items():
            (local / file).write_bytes(data)
        assert ckpt.verify(local) == [], name

    # F12: nothing registered by the failed attempt; the resume registered one READY version, aliased
    versions = client.search_model_versions("name = 'faults-lora'")
    assert [(str(v.version), v.status) for v in versions] == [("1", "READY")]
    assert resumed.model_version == "1"
    assert str(client.get_model_version_by_alias("faults-lora", "candidate").version) == "1"
    best = resumed.sweep.best.best_checkpoint.removeprefix(f"{BUCKET}/")
    assert (adapter / "adapter_model.safetensors").read_bytes() == bucket_objects(s3)[f"{best}/adapter_model.safetensors"]
