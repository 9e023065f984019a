"""An object store on loopback (moto's S3 server): MLflow artifacts in a bucket through the tracking
server, registry loading from there, and `ray.storage_path` URIs kept as written and refused clearly."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline import outbox, tracking
from pipeline.cli import app
from pipeline.config import load_config
from tests.conftest import minilm_config, write_yaml
from tests.mlflow_service import MlflowServer, env, free_port

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


def bucket_objects(endpoint: str) -> dict[str, bytes]:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=AWS["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=AWS["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET) for o in page.get("Contents", [])]
    return {k: client.get_object(Bucket=BUCKET, Key=k)["Body"].read() for k in keys}


def test_mlflow_artifacts_go_to_the_bucket_and_the_registry_loads_from_it(tmp_path: Path, sst2_small, s3, mlflow_server):
    import ray

    from pipeline.run import run_pipeline

    mlflow_server.postgres.create("mlflow_s3", "mlflow_s3_auth")
    server = MlflowServer(mlflow_server.postgres, tmp_path / "server", databases=("mlflow_s3", "mlflow_s3_auth"),
                          artifacts_destination=f"s3://{BUCKET}/mlflow",
                          extra_env={**AWS, "MLFLOW_S3_ENDPOINT_URL": s3})
    server.start()
    try:
        raw = minilm_config(tmp_path, sst2_small)
        raw["tracking"] = {"tracking_uri": server.uri, "experiment_name": "s3-sweeps", "registered_model_name": "s3-lora",
                           "system_metrics_interval_s": 0}
        config = load_config(write_yaml(tmp_path / "c.yaml", raw), env={})
        if ray.is_initialized():
            ray.shutdown()
        # the trials hold no AWS credentials: every artifact goes through the server (mlflow-artifacts:)
        with env({**server.admin(), **{k: None for k in AWS}}):
            try:
                result = run_pipeline(config)
            finally:
                ray.shutdown()
                os.environ.pop(outbox.ENV_VAR, None)
            adapter = tracking.fetch_adapter("models:/s3-lora@candidate", server.uri, tmp_path / "dl")
            experiment = tracking.raw_client(server.uri).get_experiment_by_name("s3-sweeps")
    finally:
        server.kill()
    assert experiment.artifact_location.startswith("mlflow-artifacts:")
    objects = bucket_objects(s3)
    assert not list(server.artifacts.rglob("*.safetensors"))  # nothing on the server's disk
    names = {Path(k).name for k in objects}
    assert {"adapter_model.safetensors", "adapter_config.json", "MLmodel", "config.yaml", "report.md"} <= names
    # the registered version, loaded back through the server, is the bucket's bytes
    in_bucket = [v for k, v in objects.items() if k.endswith("artifacts/adapter/adapter_model.safetensors")]
    assert (adapter / "adapter_model.safetensors").read_bytes() in in_bucket
    assert result.model_version == "1"


def test_a_storage_uri_is_kept_as_written_and_refused_before_any_work(tmp_path: Path, sst2_small):
    raw = minilm_config(tmp_path, sst2_small)
    raw["ray"]["storage_path"] = f"s3://{BUCKET}/ray"
    path = write_yaml(tmp_path / "c.yaml", raw)
    assert load_config(path, env={}).ray.storage_path == f"s3://{BUCKET}/ray"  # not mangled into s3:/...
    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 2, result.output
    assert f"ray.storage_path=s3://{BUCKET}/ray: checkpoints on an object store are not supported yet" in result.output
    assert not (tmp_path / "mlruns.db").exists()  # refused before MLflow or Ray was touched
