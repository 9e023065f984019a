"""`jobs/sweep.py` submitted to a real local cluster (`ray start --head` on loopback, token auth on)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from pipeline import tracking
from tests.conftest import REPO

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def ray_cluster(tmp_path: Path):
    import ray

    if ray.is_initialized():
        ray.shutdown()
    gcs_port, dashboard_port = free_port(), free_port()
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}
    env.pop("RAY_ADDRESS", None)
    subprocess.run(
        [f"{bin_dir}/ray", "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs_port}", "--num-cpus=2",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", "--disable-usage-stats"],
        check=True, env=env, capture_output=True, timeout=120,
    )
    try:
        yield f"http://127.0.0.1:{dashboard_port}"
    finally:
        subprocess.run([f"{bin_dir}/ray", "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_job_api_refuses_requests_without_the_token(ray_cluster: str):
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"{ray_cluster}/api/jobs/", timeout=10)
    assert info.value.code == 401


def test_submitted_job_runs_the_sweep_and_writes_mlflow(ray_cluster: str, tmp_path: Path, sst2_small):
    from ray.job_submission import JobStatus, JobSubmissionClient

    db = tmp_path / "mlruns.db"
    overrides = [
        f"data.train_path={sst2_small['train']}", f"data.eval_path={sst2_small['eval']}",
        "data.max_train_examples=64", "train.epochs=1", "train.batch_size=16", "train.eval_every_steps=2",
        f"tracking.tracking_uri=sqlite:///{db}", f"ray.storage_path={tmp_path / 'results'}",
        "sweep.parameters.lora.r={grid: [2]}", "eval.suites=[]",
        "sweep.parameters.lora.target_modules={grid: [[query, value]]}",
    ]
    client = JobSubmissionClient(ray_cluster)  # reads the token Ray wrote for this user
    job_id = client.submit_job(
        entrypoint="python jobs/sweep.py configs/quickstart.yaml " + " ".join(f"'{o}'" for o in overrides),
        runtime_env={"working_dir": str(REPO),
                     "excludes": [".venv", ".git", "data", "*.db", "loraforge_results", "reports"]},
    )
    deadline = time.time() + 420
    status = client.get_job_status(job_id)
    while status not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED} and time.time() < deadline:
        time.sleep(2)
        status = client.get_job_status(job_id)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    assert "registered: models:/quickstart-sst2-lora@candidate" in logs

    mlflow_client = tracking.client(f"sqlite:///{db}")
    experiment = mlflow_client.get_experiment_by_name("loraforge-quickstart")
    parents = mlflow_client.search_runs([experiment.experiment_id], "tags.`loraforge.kind` = 'sweep'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert "registered_eval_accuracy" in parents[0].data.metrics
    version = mlflow_client.get_model_version_by_alias("quickstart-sst2-lora", "candidate")
    assert version.status == "READY"
