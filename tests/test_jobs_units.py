"""What `loraforge submit` sends, built without a cluster: paths, upload, secrets, address, token."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipeline import jobs
from pipeline.config import ConfigError
from tests.support.configs import REPO, minilm_config, write_yaml


@pytest.fixture()
def workdir(tmp_path: Path, sst2_small) -> Path:
    """A project folder as a user has it: code, a config, fetched data, and things that must stay behind."""
    wd = tmp_path / "project"
    shutil.copytree(REPO / "jobs", wd / "jobs")
    (wd / "data" / "sst2").mkdir(parents=True)
    shutil.copy(sst2_small["train"], wd / "data" / "sst2" / "train.jsonl")
    shutil.copy(sst2_small["eval"], wd / "data" / "sst2" / "dev.jsonl")
    (wd / "data" / "e2e").mkdir()
    (wd / "data" / "e2e" / "big.csv").write_text("not needed\n")
    for junk in (".venv/bin/python", "loraforge_results/x/ckpt", "mlartifacts/1/a", ".git/HEAD", "pkg/__pycache__/m.pyc"):
        (wd / junk).parent.mkdir(parents=True, exist_ok=True)
        (wd / junk).write_text("x")
    (wd / "mlruns.db").write_text("x")
    config = minilm_config(wd, sst2_small)
    config["data"].update(train_path="sst2/train.jsonl", eval_path="sst2/dev.jsonl")
    config["tracking"]["tracking_uri"] = "sqlite:////shared/mlruns.db"
    config["ray"]["storage_path"] = "/shared/results"
    (wd / "configs").mkdir()
    write_yaml(wd / "configs" / "exp.yaml", config)
    return wd


def env_for(wd: Path, **extra: str) -> dict[str, str]:
    return {"HOME": str(wd), "LORAFORGE_DATA_ROOT": str(wd / "data"), **extra}


def test_inputs_inside_the_upload_go_up_and_the_rest_stays_behind(workdir: Path):
    plan = jobs.plan_submission(workdir / "configs" / "exp.yaml", [], working_dir=workdir, env=env_for(workdir),
                                submission_id="s1")
    assert plan.uploaded == {"data.train_path": "data/sst2/train.jsonl", "data.eval_path": "data/sst2/dev.jsonl"}
    assert plan.entrypoint == ("python jobs/sweep.py --uploaded data.train_path=data/sst2/train.jsonl "
                               "--uploaded data.eval_path=data/sst2/dev.jsonl configs/exp.yaml")
    files = jobs.upload_files(plan)
    assert {"data/sst2/train.jsonl", "data/sst2/dev.jsonl", "configs/exp.yaml", "jobs/sweep.py"} <= set(files)
    assert not [f for f in files if f.startswith((".venv", ".git", "loraforge_results", "mlartifacts", "data/e2e"))
                or f.endswith((".db", ".pyc"))], files
    assert plan.entrypoint_num_cpus == 1 and plan.runtime_env["env_vars"][jobs.DRIVER_CPUS_VAR] == "1"
    assert plan.warnings == []  # storage and tracking on shared paths


def test_an_input_outside_the_upload_is_refused_by_key_unless_on_the_cluster_or_a_uri(workdir: Path, sst2_small):
    outside = [f"data.train_path={sst2_small['train']}"]
    with pytest.raises(jobs.JobsError) as info:
        jobs.plan_submission(workdir / "configs" / "exp.yaml", outside, working_dir=workdir, env=env_for(workdir))
    assert "data.train_path" in str(info.value) and "--on-cluster data.train_path" in str(info.value)

    plan = jobs.plan_submission(workdir / "configs" / "exp.yaml", outside, working_dir=workdir, env=env_for(workdir),
                                on_cluster=["data.train_path"])
    assert "data.train_path" not in plan.uploaded and plan.entrypoint.endswith(f"data.train_path={sst2_small['train']}")

    uri = jobs.plan_submission(workdir / "configs" / "exp.yaml", ["data.train_path=s3://bucket/sst2/train.jsonl"],
                               working_dir=workdir, env=env_for(workdir))
    assert "data.train_path" not in uri.uploaded

    # checkpoints on a bucket: the cluster reaches it with its own credentials, which travel by name only
    secret = "aws-secret-" * 3
    on_s3 = jobs.plan_submission(workdir / "configs" / "exp.yaml", ["ray.storage_path=s3://bucket/sweeps"],
                                 working_dir=workdir, env=env_for(workdir, AWS_SECRET_ACCESS_KEY=secret))
    assert "ray.storage_path=s3://bucket/sweeps" in on_s3.entrypoint
    assert on_s3.runtime_env["env_vars"][jobs.SECRET_NAMES_VAR] == "AWS_SECRET_ACCESS_KEY"
    assert secret not in json.dumps(on_s3.__dict__)
    with pytest.raises(jobs.JobsError, match="sweep.scheduler: pbt copies checkpoints"):
        jobs.plan_submission(workdir / "configs" / "exp.yaml", ["ray.storage_path=s3://bucket/sweeps", "sweep.scheduler=pbt",
                                                                "sweep.parameters.train.lr={grid: [0.001, 0.003]}"],
                             working_dir=workdir, env=env_for(workdir))

    with pytest.raises(jobs.JobsError, match="--on-cluster data.train_pth: not an input path"):
        jobs.plan_submission(workdir / "configs" / "exp.yaml", [], working_dir=workdir, env=env_for(workdir),
                             on_cluster=["data.train_pth"])
    with pytest.raises(jobs.JobsError, match="outside the uploaded folder"):
        jobs.plan_submission(REPO / "configs" / "quickstart.yaml", [], working_dir=workdir, env=env_for(workdir))
    with pytest.raises(ConfigError, match="train.lr"):
        jobs.plan_submission(workdir / "configs" / "exp.yaml", ["train.lr=-1"], working_dir=workdir, env=env_for(workdir))


def test_secrets_travel_by_name_unless_forwarded(workdir: Path):
    password = "hunter2-" * 3
    env = env_for(workdir, MLFLOW_TRACKING_URI="http://mlflow:5000", MLFLOW_TRACKING_USERNAME="me",
                  MLFLOW_TRACKING_PASSWORD=password)
    plan = jobs.plan_submission(workdir / "configs" / "exp.yaml", [], working_dir=workdir, env=env)
    assert password not in json.dumps(plan.__dict__)
    assert plan.runtime_env["env_vars"][jobs.SECRET_NAMES_VAR] == "MLFLOW_TRACKING_PASSWORD"
    assert plan.runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert plan.metadata["loraforge.secret_names"] == "MLFLOW_TRACKING_PASSWORD"

    forwarded = jobs.plan_submission(workdir / "configs" / "exp.yaml", [], working_dir=workdir, env=env,
                                     forward_secrets=["MLFLOW_TRACKING_PASSWORD"])
    assert forwarded.runtime_env["env_vars"]["MLFLOW_TRACKING_PASSWORD"] == password
    assert forwarded.runtime_env["env_vars"][jobs.SECRET_NAMES_VAR] == ""
    assert password not in json.dumps(forwarded.metadata)
    with pytest.raises(jobs.JobsError, match="--forward-secret JUDGE_KEY: JUDGE_KEY is not set here"):
        jobs.plan_submission(workdir / "configs" / "exp.yaml", [], working_dir=workdir, env=env, forward_secrets=["JUDGE_KEY"])

    # credentials inside a URI or an override never travel: refused, naming the key and the way by name
    exp = workdir / "configs" / "exp.yaml"
    for env_uri, overrides, key in [(f"http://me:{password}@mlflow:5000", [], "tracking.tracking_uri"),
                                    (None, [f"tracking.tracking_uri=http://me:{password}@mlflow:5000"], "override tracking.tracking_uri"),
                                    (None, ["judge.model=m", f"judge.base_url=https://me:{password}@judge/v1"],
                                     "override judge.base_url"),
                                    (None, [f"judge.api_key={password}"], "override judge.api_key")]:
        with pytest.raises((jobs.JobsError, ConfigError)) as info:
            jobs.plan_submission(exp, overrides, working_dir=workdir,
                                 env=env_for(workdir, **({"MLFLOW_TRACKING_URI": env_uri} if env_uri else {})))
        text = str(info.value)
        assert password not in text, text
        assert key in text and "MLFLOW_TRACKING_PASSWORD" in text and "judge.api_key_env" in text, text

    # in the job: a named secret the cluster does not set is reported by name
    assert jobs.require_secrets({jobs.SECRET_NAMES_VAR: "A_TOKEN,B_KEY", "B_KEY": "x"}) == ["A_TOKEN"]
    assert jobs.uploaded_overrides(["data.train_path=data/t.jsonl"], Path("/job")) == ['data.train_path="/job/data/t.jsonl"']


def test_outputs_in_the_jobs_temporary_dir_are_warned_about(workdir: Path):
    plan = jobs.plan_submission(workdir / "configs" / "exp.yaml", ["ray.storage_path=results"], working_dir=workdir,
                                env=env_for(workdir))
    assert any("ray.storage_path" in w and "shared storage" in w for w in plan.warnings)


def test_the_address_and_the_token_are_found_as_ray_finds_them(tmp_path: Path):
    with pytest.raises(jobs.JobsError, match="RAY_API_SERVER_ADDRESS or RAY_ADDRESS"):
        jobs.resolve_address(None, {})
    with pytest.raises(jobs.JobsError, match="dashboard port"):
        jobs.resolve_address("127.0.0.1:6379", {})
    assert jobs.resolve_address(None, {"RAY_ADDRESS": "http://head:8265/"}) == "http://head:8265"
    assert jobs.resolve_address("http://a:1", {"RAY_ADDRESS": "http://b:2"}) == "http://a:1"

    assert jobs.find_token({"HOME": str(tmp_path)}) is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-file\n")
    assert jobs.find_token({"HOME": str(tmp_path)}) == ("from-file", str(tmp_path / ".ray" / "auth_token"))
    assert jobs.find_token({"HOME": str(tmp_path), "RAY_AUTH_TOKEN": "env"}) == ("env", "RAY_AUTH_TOKEN")
    with pytest.raises(jobs.JobsError, match="RAY_AUTH_TOKEN_PATH=.*no such file"):
        jobs.find_token({"HOME": str(tmp_path), "RAY_AUTH_TOKEN_PATH": str(tmp_path / "nope")})
    with pytest.raises(jobs.JobsError, match="no job server answers at http://127.0.0.1:9"):
        jobs.check_auth("http://127.0.0.1:9", {})


def test_the_upload_is_what_git_would_commit_plus_the_inputs_and_never_a_secret(workdir: Path):
    """`submit` from a working dir holding credentials: none goes up, the CLI lists what does (and --dry-run only that)."""
    import subprocess

    from typer.testing import CliRunner

    from pipeline.cli import app

    shutil.rmtree(workdir / ".git")
    secrets = [".env", ".env.local", "id_rsa", "id_ed25519.pub", ".aws/credentials", ".ssh/config", "certs/server.pem",
               "deploy.key", ".netrc", ".pypirc", "notes/private.txt"]
    for rel in secrets:
        (workdir / rel).parent.mkdir(parents=True, exist_ok=True)
        (workdir / rel).write_text("OPENAI_API_KEY=sk-not-for-the-cluster\n")
    (workdir / ".loraforgeignore").write_text("# mine\nnotes/\n")
    (workdir / ".gitignore").write_text("scratch/\n/data/*\n")
    (workdir / "scratch").mkdir()
    (workdir / "scratch" / "big.bin").write_text("x")
    (workdir / "pkg" / "train.py").write_text("x")

    def uploaded() -> list[str]:
        plan = jobs.plan_submission(workdir / "configs" / "exp.yaml", [], working_dir=workdir, env=env_for(workdir))
        assert jobs.upload_files(plan) == plan.files  # Ray's own matching of the excludes leaves exactly the list
        return plan.files

    want = ["configs/exp.yaml", "data/sst2/dev.jsonl", "data/sst2/train.jsonl", "jobs/sweep.py", "pkg/train.py"]
    # outside git: the root .gitignore; in git: what git would commit (tracked or not ignored); the same list
    assert [f for f in uploaded() if f not in (".gitignore", ".loraforgeignore")] == want
    subprocess.run(["git", "init", "-q", str(workdir)], check=True)
    subprocess.run(["git", "-C", str(workdir), "add", "jobs"], check=True)
    (workdir / "jobs" / "local_only.py").write_text("x")
    (workdir / ".git" / "info" / "exclude").write_text("jobs/local_only.py\n")
    files = uploaded()
    assert [f for f in files if f not in (".gitignore", ".loraforgeignore")] == want
    assert not any(f.startswith((".git/", ".venv", "loraforge_results", "scratch")) for f in files)

    result = CliRunner().invoke(app, ["submit", str(workdir / "configs" / "exp.yaml"), "--working-dir", str(workdir),
                                      "--dry-run"], env=env_for(workdir))
    assert result.exit_code == 0, result.output
    out = result.output
    assert "would upload 7 files" in out and "data/sst2/train.jsonl" in out
    assert "left out of the upload as secret-looking" in out
    listed = [line.split()[-1] for line in out.splitlines() if line.startswith("  ")]
    assert listed == files and not set(listed) & set(secrets)
    assert "sk-not-for-the-cluster" not in out


def test_the_images_leave_out_the_same_secret_files_as_submit():
    lines = set((REPO / ".dockerignore").read_text().splitlines())
    missing = [p for p in jobs.SECRET_FILES if f"**/{p}" not in lines]
    assert not missing, f".dockerignore lacks {missing}"
