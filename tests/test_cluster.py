"""loraforge on a real 2-node Ray cluster on loopback (token auth on): submit, follow, stop, failover.

One cluster for the module: a head with 2 CPUs (one for the job driver, `entrypoint_num_cpus`) and
a worker node with 1, each with its own temp dir and ports. The node-loss test runs last: it kills
the worker node mid-sweep.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from pipeline import tracking
from tests.support.configs import REPO
from tests.support.ray_cluster import BIN, LocalCluster

pytestmark = pytest.mark.slow

SWEEP = [
    "data.max_train_examples=640", "data.max_seq_len=32", "train.epochs=1", "train.batch_size=16",
    "train.eval_every_steps=5", "train.log_every_steps=5", "train.max_failures=2", "sweep.scheduler=fifo",
    "sweep.parameters.lora.r={grid: [2, 4]}", "sweep.parameters.lora.target_modules={grid: [[query, value]]}",
    "eval.suites=[]", "sweep.pack_size=1",  # one trial per config: the failover test needs one on each node
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    import ray

    if ray.is_initialized():  # an instance an earlier test left in this process: its stop would kill it under us
        ray.shutdown()
    c = LocalCluster(tmp_path_factory.mktemp("cluster"))
    try:
        c.start_head(num_cpus=2)
        c.add_worker("worker", num_cpus=1)
        c.wait_for_nodes(2)
        yield c
    finally:
        c.stop()


def loraforge(cluster: LocalCluster, *args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "loraforge"), *args], cwd=REPO, env=env or cluster.client_env(),
                          capture_output=True, text=True, timeout=timeout)


def job_info(cluster: LocalCluster, job_id: str) -> dict:
    request = urllib.request.Request(f"{cluster.address}/api/jobs/{job_id}",
                                     headers={"Authorization": f"Bearer {cluster.token}"})
    with urllib.request.urlopen(request, timeout=10) as reply:
        return json.load(reply)


def job_logs(cluster: LocalCluster, job_id: str) -> str:
    request = urllib.request.Request(f"{cluster.address}/api/jobs/{job_id}/logs",
                                     headers={"Authorization": f"Bearer {cluster.token}"})
    with urllib.request.urlopen(request, timeout=10) as reply:
        return json.load(reply)["logs"]


def test_the_job_api_needs_the_token_and_the_cli_names_the_variable(cluster: LocalCluster):
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"{cluster.address}/api/jobs/", timeout=10)
    assert info.value.code == 401

    no_token = cluster.client_env()
    no_token.pop("RAY_AUTH_TOKEN")
    missing = loraforge(cluster, "jobs", "list", "--address", cluster.address, env=no_token)
    assert missing.returncode == 2, missing.stderr
    assert "requires a token" in missing.stderr and "RAY_AUTH_TOKEN" in missing.stderr
    assert "Traceback" not in missing.stderr

    wrong = loraforge(cluster, "jobs", "list", "--address", cluster.address, env=cluster.client_env(RAY_AUTH_TOKEN="0" * 32))
    assert wrong.returncode == 2 and "refused the token from RAY_AUTH_TOKEN" in wrong.stderr, wrong.stderr

    # the token in ~/.ray/auth_token, RAY_AUTH_MODE unset: loraforge turns token mode on for the SDK
    (cluster.home / ".ray").mkdir(exist_ok=True)
    (cluster.home / ".ray" / "auth_token").write_text(cluster.token)
    ok = loraforge(cluster, "jobs", "list", env=no_token | {"RAY_API_SERVER_ADDRESS": cluster.address})
    assert ok.returncode == 0, ok.stderr
    (cluster.home / ".ray" / "auth_token").unlink()

    unknown = loraforge(cluster, "jobs", "status", "no-such-job", "--address", cluster.address)
    assert unknown.returncode == 2 and "no-such-job" in unknown.stderr, unknown.stderr


def project_with_secrets(root: Path, sst2_small) -> tuple[Path, list[str]]:
    """A user's working dir: the job's code and config, its data, and files that hold credentials."""
    import shutil

    wd = root / "project"
    shutil.copytree(REPO / "jobs", wd / "jobs", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "configs", wd / "configs")
    (wd / "data" / "sst2").mkdir(parents=True)
    shutil.copy(sst2_small["train"], wd / "data" / "sst2" / "train.jsonl")
    secrets = [".env", "id_rsa", ".aws/credentials"]
    for rel in secrets:
        (wd / rel).parent.mkdir(parents=True, exist_ok=True)
        (wd / rel).write_text("OPENAI_API_KEY=sk-planted-in-the-working-dir\n")
    return wd, secrets


def package_store(cluster: LocalCluster) -> list[Path]:
    """The working dirs Ray unpacked from uploaded packages, on every node."""
    return [p for node in cluster.nodes for p in node.temp_dir.rglob("_ray_pkg_*") if p.is_dir()]


def test_secrets_travel_by_name_and_a_missing_one_fails_the_job_with_exit_2(cluster: LocalCluster, tmp_path: Path, sst2_small):
    password = "pw-" + "s3cr3t" * 4
    dead = "http://127.0.0.1:9"  # nothing listens: the job must stop at the secret check, then at preflight
    wd, secret_files = project_with_secrets(tmp_path, sst2_small)
    args = ["submit", "configs/quickstart.yaml", "--address", cluster.address, "--follow", "--working-dir", str(wd),
            "--on-cluster", "data.eval_path", f"data.eval_path={sst2_small['eval']}", f"tracking.tracking_uri={dead}",
            f"ray.storage_path={tmp_path / 'results'}", *SWEEP]
    env = cluster.client_env(MLFLOW_TRACKING_USERNAME="loraforge", MLFLOW_TRACKING_PASSWORD=password,
                             LORAFORGE_DATA_ROOT=str(wd / "data"))
    before = set(package_store(cluster))

    named = subprocess.run([str(BIN / "loraforge"), *args], cwd=wd, env=env, capture_output=True, text=True, timeout=180)
    assert named.returncode == 2, named.stdout[-3000:] + named.stderr[-3000:]
    assert "the job needs MLFLOW_TRACKING_PASSWORD and the cluster does not set it" in named.stdout + named.stderr
    job_id = named.stdout.strip().splitlines()[0]
    info = job_info(cluster, job_id)
    assert info["metadata"]["loraforge.secret_names"] == "MLFLOW_TRACKING_PASSWORD"
    assert info["driver_exit_code"] == 2
    assert password not in json.dumps(info) and password not in job_logs(cluster, job_id)
    # the uploaded input is resolved in the job's working dir; the --on-cluster one is passed as written
    assert "--uploaded data.train_path=data/sst2/train.jsonl" in info["entrypoint"]
    # what reached the cluster's package store: the job's files, none of the credentials beside them
    unpacked = set(package_store(cluster)) - before
    assert unpacked, f"no package unpacked under {[n.temp_dir for n in cluster.nodes]}"
    for pkg in unpacked:
        files = {p.relative_to(pkg).as_posix() for p in pkg.rglob("*") if p.is_file()}
        assert {"configs/quickstart.yaml", "data/sst2/train.jsonl", "jobs/sweep.py"} <= files, files
        assert not set(secret_files) & files and not any("sk-planted" in (pkg / f).read_text(errors="replace")
                                                         for f in files), files
    assert "left out of the upload as secret-looking: .aws/credentials, .env, id_rsa" in named.stderr

    forwarded = subprocess.run([str(BIN / "loraforge"), *args, "--forward-secret", "MLFLOW_TRACKING_PASSWORD"], cwd=wd,
                               env=env, capture_output=True, text=True, timeout=180)
    assert "visible to anyone holding" in forwarded.stderr or "shows to anyone holding" in forwarded.stderr
    job_id = forwarded.stdout.strip().splitlines()[0]
    logs = job_logs(cluster, job_id)
    # past the secret check, stopped by the unreachable tracking server (exit 2, named), the value never logged
    assert forwarded.returncode == 2, logs[-3000:]
    assert "the job needs" not in logs and "127.0.0.1:9" in logs
    assert password not in logs and password not in json.dumps(job_info(cluster, job_id)["metadata"])


def test_plain_ray_job_submit_runs_jobs_sweep_and_loraforge_stops_it(cluster: LocalCluster, tmp_path: Path, sst2_small):
    overrides = [f"data.train_path={sst2_small['train']}", f"data.eval_path={sst2_small['eval']}",
                 f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlruns.db'}", f"ray.storage_path={tmp_path / 'results'}",
                 "train.epochs=50", *SWEEP[3:]]
    submitted = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", cluster.address, "--no-wait", "--working-dir", ".",
         "--", "python", "jobs/sweep.py", "configs/quickstart.yaml", *overrides],
        cwd=REPO, env=cluster.env(), capture_output=True, text=True, timeout=120)
    assert submitted.returncode == 0, submitted.stdout[-2000:] + submitted.stderr[-2000:]
    job_id = re.search(r"raysubmit_[A-Za-z0-9]+", submitted.stdout + submitted.stderr)[0]
    deadline = time.time() + 180
    while "sweep quickstart-sst2: 2 trials" not in job_logs(cluster, job_id) and time.time() < deadline:
        assert job_info(cluster, job_id)["status"] in ("PENDING", "RUNNING"), job_logs(cluster, job_id)[-3000:]
        time.sleep(1)
    assert "sweep quickstart-sst2: 2 trials" in job_logs(cluster, job_id)

    listed = loraforge(cluster, "jobs", "list", "--address", cluster.address)
    assert listed.returncode == 0 and job_id in listed.stdout, listed.stderr
    stopped = loraforge(cluster, "jobs", "stop", job_id, "--address", cluster.address)
    assert stopped.returncode == 0 and "stop requested" in stopped.stdout, stopped.stderr
    deadline = time.time() + 60
    while job_info(cluster, job_id)["status"] != "STOPPED" and time.time() < deadline:
        time.sleep(1)
    status = loraforge(cluster, "jobs", "status", job_id, "--address", cluster.address, "--json")
    assert status.returncode == 1 and json.loads(status.stdout)["status"] == "STOPPED", status.stdout


def test_submit_to_a_head_with_no_job_agent_yet_retries_within_a_bound(cluster: LocalCluster, tmp_path: Path, sst2_small):
    """Ray's "No available agent" (HTTP 500, a head still starting): retried, then submitted; forever: exit 2 in bound."""
    from tests.support.job_proxy import JobServerProxy

    args = ["submit", "configs/quickstart.yaml", "--on-cluster", "data.eval_path", f"data.eval_path={sst2_small['eval']}",
            "tracking.tracking_uri=http://127.0.0.1:9", f"ray.storage_path={tmp_path / 'results'}", *SWEEP]
    with JobServerProxy(cluster.address, refuse=2) as proxy:
        submitted = loraforge(cluster, *args, "--address", proxy.url)
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    assert proxy.submits == 3
    assert submitted.stderr.count("the job server has no agent to take the job yet") == 2
    job_id = submitted.stdout.strip().splitlines()[-1]
    deadline = time.time() + 120  # the job stops at preflight (nothing listens on :9); wait so it holds no CPU after
    while job_info(cluster, job_id)["status"] in ("PENDING", "RUNNING") and time.time() < deadline:
        time.sleep(1)
    assert job_info(cluster, job_id)["driver_exit_code"] == 2

    with JobServerProxy(cluster.address, refuse=float("inf")) as proxy:
        start = time.monotonic()
        refused = loraforge(cluster, *args, "--address", proxy.url, "--agent-wait-s", "3")
        took = time.monotonic() - start
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert f"the job server at {proxy.url} had no agent to take the job" in refused.stderr
    assert "--agent-wait-s" in refused.stderr and "Traceback" not in refused.stderr
    assert 2 <= proxy.submits <= 4 and took < 60


def _node_ids(cluster: LocalCluster) -> dict[int, str]:
    request = urllib.request.Request(f"{cluster.address}/nodes?view=summary", headers={"Authorization": f"Bearer {cluster.token}"})
    with urllib.request.urlopen(request, timeout=10) as reply:
        summary = json.load(reply)["data"]["summary"]
    return {n["raylet"]["nodeManagerPort"]: n["raylet"]["nodeId"] for n in summary if n["raylet"]["state"] == "ALIVE"}


def test_a_submitted_sweep_spreads_over_both_nodes_and_survives_losing_one(cluster: LocalCluster, tmp_path: Path, sst2_small):
    head, worker = cluster.nodes
    ids = _node_ids(cluster)
    head_id, worker_id = ids[head.node_manager_port], ids[worker.node_manager_port]
    db, results = tmp_path / "mlruns.db", tmp_path / "results"  # one folder both nodes reach: the shared storage
    submitted = loraforge(cluster, "submit", "configs/quickstart.yaml", "--address", cluster.address,
                          "--on-cluster", "data.eval_path", f"data.eval_path={sst2_small['eval']}",
                          f"tracking.tracking_uri=sqlite:///{db}", f"ray.storage_path={results}", *SWEEP)
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    job_id = submitted.stdout.strip().splitlines()[-1]

    # wait until the trial on the worker node has a checkpoint, then kill that node
    deadline, victim = time.time() + 240, None
    while time.time() < deadline and victim is None:
        assert job_info(cluster, job_id)["status"] in ("PENDING", "RUNNING"), job_logs(cluster, job_id)[-4000:]
        # the driver creates and migrates the database before any trial starts: read it only once a
        # checkpoint exists, so this client never races that migration
        if list(results.glob("*/train/train-*/checkpoint_*")):
            client = tracking.client(f"sqlite:///{db}")
            experiment = client.get_experiment_by_name("loraforge-quickstart")
            runs = client.search_runs([experiment.experiment_id], "tags.`loraforge.kind` = 'trial'") if experiment else []
            on_worker = [r for r in runs if r.data.tags.get("loraforge.node_id") == worker_id]
            for run in on_worker:
                trial_id = run.data.tags["loraforge.trial_id"]
                if list(results.glob(f"*/train/train-{trial_id}/checkpoint_*")):
                    victim = trial_id
        time.sleep(0.5)
    assert victim is not None, "no trial checkpointed on the worker node: " + job_logs(cluster, job_id)[-4000:]
    cluster.kill(worker)

    followed = loraforge(cluster, "jobs", "logs", job_id, "--follow", "--address", cluster.address, timeout=420)
    assert followed.returncode == 0, followed.stdout[-5000:]
    assert "registered: models:/quickstart-sst2-lora@candidate" in followed.stdout

    client = tracking.client(f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("loraforge-quickstart")
    trials = client.search_runs([experiment.experiment_id], "tags.`loraforge.kind` = 'trial'")
    assert len(trials) == 2 and all(t.info.status == "FINISHED" for t in trials), [(t.info.status, t.data.tags) for t in trials]
    first_nodes = {t.data.tags["loraforge.node_ids"].split(",")[0] for t in trials}
    assert first_nodes == {head_id, worker_id}  # one trial started on each node
    moved = next(t for t in trials if t.data.tags["loraforge.trial_id"] == victim)
    assert moved.data.tags["loraforge.node_ids"].split(",") == [worker_id, head_id]
    assert int(moved.data.tags["loraforge.resumed_from_step"]) > 0  # resumed from its checkpoint, not from scratch
    parent = client.search_runs([experiment.experiment_id], "tags.`loraforge.kind` = 'sweep'")[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags.get("mlflow.source.git.commit") == job_info(cluster, job_id)["metadata"].get("loraforge.git_commit")


def test_f7_a_lost_head_ends_the_followed_job_plainly_and_resume_on_a_new_cluster_finishes_it(
        cluster: LocalCluster, tmp_path: Path, sst2_small):
    """F7, head node death without GCS fault tolerance: the whole cluster is gone, `submit --follow` says so
    (exit 1, what is kept, the --resume command), and `submit --resume` on a new cluster continues the sweep
    from the shared storage: the same MLflow parent and trial runs, one registered version. Runs last: it
    kills the module's cluster."""
    db, results = tmp_path / "mlruns.db", tmp_path / "results"  # storage that outlives the cluster
    args = ["submit", "configs/quickstart.yaml", "--on-cluster", "data.eval_path", f"data.eval_path={sst2_small['eval']}",
            f"tracking.tracking_uri=sqlite:///{db}", f"ray.storage_path={results}", *SWEEP, "--follow"]
    following = subprocess.Popen([str(BIN / "loraforge"), *args, "--address", cluster.address], cwd=REPO,
                                 env=cluster.client_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    def committed() -> bool:
        """A checkpoint Ray Train has recorded in a run snapshot (files alone may never be counted)."""
        for snapshot in results.glob("*/train/train-*/checkpoint_manager_snapshot.json"):
            try:
                if json.loads(snapshot.read_text()).get("checkpoint_results"):
                    return True
            except (OSError, ValueError):
                pass  # being rewritten
        return False

    try:
        deadline = time.time() + 240
        while not committed() and time.time() < deadline:
            assert following.poll() is None, following.communicate()
            time.sleep(0.2)
        assert committed(), "no checkpoint before the head was killed"
        for node in list(cluster.nodes):
            cluster.kill(node)
        out, err = following.communicate(timeout=120)
    finally:
        if following.poll() is None:
            following.kill()
    assert following.returncode == 1, out[-2000:] + err[-3000:]
    assert f"lost the job server at {cluster.address}" in err and "--resume" in err and "Traceback" not in err

    second = LocalCluster(tmp_path / "cluster2")
    try:
        second.start_head(num_cpus=3)
        try:
            resumed = subprocess.run([str(BIN / "loraforge"), *args, "--resume", "--address", second.address], cwd=REPO,
                                     env=second.client_env(), capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired as err:
            raise AssertionError((err.stdout or b"")[-8000:].decode(errors="replace")) from None
    finally:
        second.stop()
    assert resumed.returncode == 0, resumed.stdout[-4000:] + resumed.stderr[-3000:]
    assert "registered: models:/quickstart-sst2-lora@candidate" in resumed.stdout

    client = tracking.client(f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("loraforge-quickstart")
    parents = client.search_runs([experiment.experiment_id], "tags.`loraforge.kind` = 'sweep'")
    trials = client.search_runs([experiment.experiment_id], "tags.`loraforge.kind` = 'trial'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"  # continued, not a second sweep
    assert len(trials) == 2 and all(t.info.status == "FINISHED" for t in trials)
    assert any(int(t.data.tags.get("loraforge.resumed_from_step", 0)) > 0 for t in trials)  # not from scratch
    assert [str(v.version) for v in client.search_model_versions("name = 'quickstart-sst2-lora'")] == ["1"]
