"""Ray jobs from the command line: `loraforge submit` and `loraforge jobs list|status|logs|stop`.

Everything goes through Ray's Jobs SDK (`JobSubmissionClient`) at the job server's URL: `--address`,
else RAY_API_SERVER_ADDRESS, else RAY_ADDRESS, as `ray job submit` reads them.

A submission uploads the working dir (Ray's `working_dir`) and runs `jobs/sweep.py` there. What goes
up is an explicit list (`upload_plan`): the files git would commit (tracked, or untracked and not
ignored; the root `.gitignore` outside git) plus the inputs the config names, less environments,
results and stores, less anything that holds credentials (`SECRET_FILES`) or that `.loraforgeignore`
names; Ray gets it as excludes of everything else. The config is validated here first;
every input file it names must lie inside the upload, be a URI, or be marked as present on the
cluster (`--on-cluster KEY`). Uploaded inputs are passed as `--uploaded KEY=REL`, which the job
resolves against its own working dir. Secrets travel by name only, unless `--forward-secret`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from pipeline import redact
from pipeline.config import ExperimentConfig, load_config
from pipeline.datafiles import data_root

log = logging.getLogger("loraforge")

ADDRESS_VARS = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
# set on the job: the secrets it needs, by name (the cluster supplies the values), and the CPUs its driver holds
SECRET_NAMES_VAR = "LORAFORGE_SECRET_NAMES"
DRIVER_CPUS_VAR = "LORAFORGE_DRIVER_CPUS"
GIT_COMMIT_VAR = "LORAFORGE_GIT_COMMIT"
# never uploaded: environments, results and stores, caches, VCS state (gitignore-style, relative to the working dir)
UPLOAD_EXCLUDES = [
    ".git", ".venv", "venv", "**/__pycache__", "*.pyc", "*.egg-info", ".pytest_cache", "build", "dist",
    "loraforge_results", "mlruns", "mlartifacts", "*.db", "reports", "bench/results", ".whl", ".gl",
]
# never uploaded, whatever git says: files that hold credentials (gitignore-style)
SECRET_FILES = [".env", ".env.*", "*.pem", "*.key", "id_*", ".netrc", ".pypirc", ".git-credentials", ".aws", ".ssh",
                ".docker/config.json", ".kube", "*.p12", "*.pfx", "credentials.json"]
IGNORE_FILE = ".loraforgeignore"  # the user's own list, gitignore-style, relative to the working dir
# the job's variables that are not secrets but that it needs to reach the same services
PASSED_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "LORAFORGE_DATA_MIRROR", "LORAFORGE_DATA_OFFLINE")
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


class JobsError(Exception):
    """A problem with the request (address, token, config, paths): exit 2, nothing submitted."""


# ---- the job server and its token


def resolve_address(address: str | None, env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    for value in (address, *(env.get(v) for v in ADDRESS_VARS)):
        if value:
            if not value.startswith(("http://", "https://")):
                raise JobsError(f"--address {value!r}: give the job server's URL, e.g. http://head:8265 (the "
                                "dashboard port), not the GCS address")
            return value.rstrip("/")
    raise JobsError(f"no job server: pass --address http://HEAD:8265 or set {' or '.join(ADDRESS_VARS)}")


def find_token(env: Mapping[str, str] | None = None) -> tuple[str, str] | None:
    """(token, where it came from), in Ray's order: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    env = os.environ if env is None else env
    if env.get("RAY_AUTH_TOKEN"):
        return env["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN"
    if env.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(env["RAY_AUTH_TOKEN_PATH"]).expanduser()
        if not path.is_file():
            raise JobsError(f"RAY_AUTH_TOKEN_PATH={path}: no such file; point it at the cluster's token file")
        return path.read_text().strip(), "RAY_AUTH_TOKEN_PATH"
    default = Path(env.get("HOME") or Path.home()) / ".ray" / "auth_token"
    if default.is_file():
        return default.read_text().strip(), str(default)
    return None


def _probe(url: str, token: str | None, timeout_s: float = 15) -> int:
    request = urllib.request.Request(f"{url}/api/version")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as reply:
            return reply.status
    except urllib.error.HTTPError as err:
        return err.code
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise JobsError(f"no job server answers at {url} ({reason}): is the cluster up, and is that the "
                        "dashboard's port (8265 by default; port-forward it from a remote cluster)?") from None


def check_auth(url: str, env: dict[str, str] | None = None) -> None:
    """Make Ray's SDK send the token a token-auth cluster requires, or fail naming the variable.

    Ray 2.60's SDK sends `Authorization: Bearer` only when RAY_AUTH_MODE=token is set in this
    process; when the server asks for a token and one is found, this sets it.
    """
    env = os.environ if env is None else env
    if _probe(url, None) not in (401, 403):
        return
    found = find_token(env)
    if found is None:
        raise JobsError(f"the job server at {url} requires a token (Ray token auth) and none was found: set "
                        f"RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH, or write it to ~/.ray/auth_token) and RAY_AUTH_MODE=token")
    token, where = found
    if env.get("RAY_AUTH_MODE", "").lower() == "disabled":
        raise JobsError(f"the job server at {url} requires a token but RAY_AUTH_MODE=disabled here: set RAY_AUTH_MODE=token")
    if _probe(url, token) in (401, 403):
        raise JobsError(f"the job server at {url} refused the token from {where}: it is not this cluster's token; "
                        "set RAY_AUTH_TOKEN to the one in the head's ~/.ray/auth_token (KubeRay: the cluster's Secret)")
    env["RAY_AUTH_MODE"] = "token"


def client(address: str | None) -> Any:
    """A JobSubmissionClient for the job server, its token checked first."""
    url = resolve_address(address)
    check_auth(url)
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(url)
    except (ConnectionError, RuntimeError) as err:
        raise JobsError(f"the job server at {url}: {redact.redact_text(str(err))}") from None


# ---- what a submission sends


@dataclass
class Submission:
    entrypoint: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str]
    entrypoint_num_cpus: float
    submission_id: str
    uploaded: dict[str, str] = field(default_factory=dict)  # config key -> path inside the upload
    warnings: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)  # every file that goes up, relative to the working dir


def _pathspec(lines: Iterable[str]) -> Any:
    """gitignore matching (PyPI's pathspec: importing Ray's copy would import Ray before the token check)."""
    import pathspec

    return pathspec.GitIgnoreSpec.from_lines([line for line in lines if line.strip() and not line.startswith("#")])


def _git_files(working_dir: Path) -> list[str] | None:
    """The files git would commit under `working_dir` (tracked, or untracked and not ignored); None outside git."""
    try:
        listed = subprocess.run(["git", "-C", str(working_dir), "ls-files", "-z", "--cached", "--others",
                                 "--exclude-standard"], capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if listed.returncode != 0:
        return None
    return [p for p in listed.stdout.decode().split("\0") if p]


def _walk_files(working_dir: Path, skip: Any) -> list[str]:
    files = []
    for dirpath, dirnames, filenames in os.walk(working_dir):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if not skip.match_file((here / d).relative_to(working_dir).as_posix())]
        files += [rel for f in filenames if not skip.match_file(rel := (here / f).relative_to(working_dir).as_posix())]
    return files


def upload_plan(working_dir: Path, needed: Iterable[str]) -> tuple[list[str], list[str]]:
    """(files, left_out_secrets): what goes up from `working_dir` (relative paths, sorted), and the
    secret-looking files that would have gone and do not (so the CLI can say so)."""
    working_dir = working_dir.resolve()
    listed = _git_files(working_dir)
    if listed is None:  # outside git: the root .gitignore, as Ray itself reads it
        gitignore = working_dir / ".gitignore"
        listed = _walk_files(working_dir, _pathspec(gitignore.read_text().splitlines() if gitignore.is_file() else [".git"]))
    user_ignore = working_dir / IGNORE_FILE
    own = user_ignore.read_text().splitlines() if user_ignore.is_file() else []
    drop, secret = _pathspec([*UPLOAD_EXCLUDES, *own]), _pathspec([*SECRET_FILES, *own])
    needed = set(needed)
    files, secrets = set(), []
    for rel in {*listed, *needed}:
        if not (working_dir / rel).is_file():  # a tracked file deleted from the tree
            continue
        if secret.match_file(rel):
            secrets.append(rel)
        elif rel in needed or not drop.match_file(rel):
            files.add(rel)
    return sorted(files), sorted(secrets)


def _escape(rel: str) -> str:
    return "".join("\\" + c if c in "\\*?[]!#" else c for c in rel)


def excludes_for(working_dir: Path, files: list[str]) -> list[str]:
    """Ray `excludes` that leave exactly `files`: each folder without any of them, each other file, anchored."""
    keep = set(files)
    keep_dirs = {p.as_posix() for f in files for p in Path(f).parents if p.as_posix() != "."}
    excludes = []
    for dirpath, dirnames, filenames in os.walk(working_dir):
        here = Path(dirpath).relative_to(working_dir)
        kept_dirs = []
        for d in sorted(dirnames):
            rel = (here / d).as_posix()
            if rel in keep_dirs and not (Path(dirpath) / d).is_symlink():
                kept_dirs.append(d)
            else:
                excludes.append("/" + _escape(rel))
        dirnames[:] = kept_dirs
        excludes += ["/" + _escape(rel) for f in sorted(filenames) if (rel := (here / f).as_posix()) not in keep]
    return excludes


def secret_names(config: ExperimentConfig, env: Mapping[str, str]) -> list[str]:
    """The secret variables the job needs on the cluster (names only)."""
    from pipeline.eval.catalog import suite_names  # here, not above: `loraforge jobs list` needs no model stack

    names = []
    suites = suite_names(config)
    if config.judge.api_key_env and any(s.startswith("judge") for s in suites):
        names.append(config.judge.api_key_env)
    if config.tracking.tracking_uri.startswith(("http://", "https://")):
        names += [v for v in ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN") if env.get(v)]
    if str(config.ray.storage_path).startswith("s3://"):
        names += [v for v in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN") if env.get(v)]
    return names


def _raw_value(config_path: Path, overrides: list[str], key: str) -> Any:
    """The value of `key` as written (last override, else the YAML), before paths are resolved."""
    import yaml

    for override in reversed(overrides):
        name, _, value = override.partition("=")
        if name.strip() == key:
            return value.strip()
    node: Any = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    for part in key.split("."):
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


_BY_NAME = ("pass it by variable name instead: MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD for the "
            "tracking server, judge.api_key_env for the judge, AWS_* for a bucket; the cluster supplies the value "
            "(or --forward-secret NAME)")


def override_credentials(overrides: list[str]) -> list[str]:
    """Credentials written into the command line: a job's entrypoint is shown to everyone holding the
    cluster's token, so `submit` refuses them (before the config is even read)."""
    problems = []
    for override in overrides:
        key, _, value = override.partition("=")
        key = key.strip()
        if redact.is_secret_name(key.rsplit(".", 1)[-1]) or redact.redact_text(value, []) != value:
            shown = redact.redact({key: value}, "")[key] if redact.is_secret_name(key.rsplit(".", 1)[-1]) else \
                redact.redact_text(value, [])
            problems.append(f"override {key}: holds a credential ({key}={shown}), and the job's "
                            f"command line is visible to the cluster; {_BY_NAME}")
    return problems


def config_credentials(config: ExperimentConfig, overrides: list[str]) -> list[str]:
    """URIs of the config (or of MLFLOW_TRACKING_URI, folded into it) that carry `user:password@`."""
    problems = []
    for key, value in (("tracking.tracking_uri", config.tracking.tracking_uri), ("judge.base_url", config.judge.base_url),
                       ("ray.storage_path", str(config.ray.storage_path))):
        if value and redact.redact_text(value, []) != value and not any(o.partition("=")[0].strip() == key for o in overrides):
            problems.append(f"{key}: the URI holds a user and password ({redact.redact_text(value, [])}), that would "
                            f"travel with the job (its config or environment); {_BY_NAME}")
    return problems


def tree_commit(working_dir: Path) -> tuple[str | None, bool]:
    """(commit, dirty) of the git tree at `working_dir`; (None, False) outside git."""
    try:
        head = subprocess.run(["git", "-C", str(working_dir), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        status = subprocess.run(["git", "-C", str(working_dir), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None, False
    if head.returncode != 0:
        return None, False
    return head.stdout.strip(), bool(status.stdout.strip())


def plan_submission(config_path: Path, overrides: list[str], *, working_dir: Path = Path("."),
                    on_cluster: Iterable[str] = (), forward_secrets: Iterable[str] = (), entrypoint_num_cpus: float = 1.0,
                    submission_id: str | None = None, env: Mapping[str, str] | None = None,
                    resume: bool = False) -> Submission:
    """Validate the config as the job will, and build what `submit_job` sends. Raises ConfigError / JobsError."""
    env = dict(os.environ if env is None else env)
    working_dir = working_dir.resolve()
    config_path = config_path.resolve()
    try:
        config_rel = config_path.relative_to(working_dir)
    except ValueError:
        raise JobsError(f"CONFIG {config_path} is outside the uploaded folder {working_dir}; move it there "
                        "or pass --working-dir") from None
    if problems := override_credentials(overrides):
        raise JobsError("; ".join(problems))
    # the cluster supplies its own address; the rest of the environment folds in as it will there
    config = load_config(config_path, overrides, env={k: v for k, v in env.items() if k != "RAY_ADDRESS"})
    from pipeline import preflight  # here, not above: `loraforge jobs list` needs no model stack

    on_cluster = list(on_cluster)
    paths = preflight.input_paths(config)
    problems = [f"--on-cluster {key}: not an input path of this config (it reads {', '.join(paths)})"
                for key in on_cluster if key not in paths]
    problems += config_credentials(config, overrides)
    uploaded: dict[str, str] = {}
    for key, local in paths.items():
        raw = _raw_value(config_path, overrides, key)
        if key in on_cluster or (isinstance(raw, str) and "://" in raw):
            continue
        try:
            rel = local.relative_to(working_dir)
        except ValueError:
            problems.append(f"{key}: {local} is outside the uploaded folder {working_dir}; move it under it, use a "
                            f"URI (s3://...), or pass --on-cluster {key} if the cluster has it at {raw!r}")
            continue
        if not local.is_file():
            problems.append(f"{key}: {local} not found; fetch it first (loraforge data fetch) or pass --on-cluster {key}")
            continue
        uploaded[key] = rel.as_posix()
    # the bucket is the cluster's to reach (its nodes may hold credentials this machine lacks)
    problems += preflight.check_storage(config, reach=False)
    forward = list(forward_secrets)
    for name in forward:
        if not env.get(name):
            problems.append(f"--forward-secret {name}: {name} is not set here")
    if problems:
        raise JobsError("; ".join(problems))

    # what goes up: what git would commit, the config and the inputs it names, no secrets (upload_plan);
    # Ray's own .gitignore handling is off for the submission (the excludes already say it all)
    files, secret_files = upload_plan(working_dir, [config_rel.as_posix(), *uploaded.values()])
    # fetched data under the upload that this config does not read stays behind
    root = data_root(env).resolve()
    if root.is_relative_to(working_dir) and root != working_dir:
        data_rel = root.relative_to(working_dir).as_posix() + "/"
        keep = set(uploaded.values())
        files = [f for f in files if not f.startswith(data_rel) or f in keep or f == data_rel + "README.md"]
    excludes = excludes_for(working_dir, files)

    warnings = []
    if secret_files:
        warnings.append(f"left out of the upload as secret-looking: {', '.join(secret_files)}")
    # outputs given relative resolve in the job's temporary working dir on the cluster
    storage = str(_raw_value(config_path, overrides, "ray.storage_path") or "loraforge_results")
    if "://" not in storage and not Path(storage).is_absolute():
        warnings.append(f"ray.storage_path={storage} lies in the job's temporary working dir on the cluster; point it "
                        "at shared storage (a mounted volume or s3://...) to keep checkpoints")
    in_overrides = any(o.partition("=")[0].strip() == "tracking.tracking_uri" for o in overrides)
    uri = str((not in_overrides and env.get("MLFLOW_TRACKING_URI")) or _raw_value(config_path, overrides, "tracking.tracking_uri") or "")
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        warnings.append(f"tracking.tracking_uri={uri} is a file in the job's temporary working dir on the cluster; "
                        "use an MLflow server (http://...) or an absolute path on shared storage")
    commit, dirty = tree_commit(working_dir)
    if dirty:
        warnings.append(f"the working tree has uncommitted changes; runs are tagged with commit {commit}, which does "
                        "not hold them")
    env_vars = {k: env[k] for k in PASSED_VARS if env.get(k)}
    if "MLFLOW_TRACKING_URI" in env_vars:
        env_vars["MLFLOW_TRACKING_URI"] = redact.redact_text(env_vars["MLFLOW_TRACKING_URI"], [])
    needed = [n for n in secret_names(config, env) if n not in forward]
    env_vars[SECRET_NAMES_VAR] = ",".join(needed)
    env_vars[DRIVER_CPUS_VAR] = f"{entrypoint_num_cpus:g}"
    if commit:
        env_vars[GIT_COMMIT_VAR] = commit
    for name in forward:
        env_vars[name] = env[name]
    entrypoint = ["python", "jobs/sweep.py"]
    for key, rel in uploaded.items():
        entrypoint += ["--uploaded", f"{key}={rel}"]
    entrypoint += [config_rel.as_posix(), *overrides, *(["--resume"] if resume else [])]
    metadata = {"loraforge.config": config.name, "loraforge.config_file": config_rel.as_posix(),
                "loraforge.secret_names": ",".join(needed), "loraforge.forwarded_secrets": ",".join(forward)}
    if commit:
        metadata["loraforge.git_commit"] = commit
    return Submission(
        entrypoint=redact.redact_text(shlex.join(entrypoint)),
        runtime_env={"working_dir": str(working_dir), "excludes": excludes, "env_vars": env_vars},
        metadata=metadata, entrypoint_num_cpus=entrypoint_num_cpus,
        submission_id=submission_id or f"loraforge-{config.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}",
        uploaded=uploaded, warnings=warnings, files=files,
    )


def upload_files(submission: Submission) -> list[str]:
    """The files Ray will upload for `submission` (its excludes applied by Ray's own copy of pathspec)."""
    from ray._private.thirdparty.pathspec import PathSpec

    root = Path(submission.runtime_env["working_dir"])
    return sorted(_walk_files(root, PathSpec.from_lines("gitwildmatch", submission.runtime_env["excludes"])))


# Ray's job server while the head's dashboard agent is not up yet (right after `ray start`): HTTP 500
NO_AGENT = "No available agent to submit job"


def submit(job_client: Any, submission: Submission, *, agent_wait_s: float = 120.0,
           say: Callable[[str], None] = lambda text: print(text, file=sys.stderr)) -> str:
    """Submit; while the job server has no agent to take the job (a head still starting), retry for `agent_wait_s`."""
    # Ray would leave git-ignored files out, and data/ is git-ignored; our excludes say what stays behind
    os.environ["RAY_RUNTIME_ENV_IGNORE_GITIGNORE"] = "1"
    start, delay = time.monotonic(), 1.0
    while True:
        try:
            return job_client.submit_job(entrypoint=submission.entrypoint, runtime_env=submission.runtime_env,
                                         metadata=submission.metadata, submission_id=submission.submission_id,
                                         entrypoint_num_cpus=submission.entrypoint_num_cpus)
        except RuntimeError as err:
            if NO_AGENT not in str(err):
                raise
            waited = time.monotonic() - start
            if waited + delay > agent_wait_s:
                raise JobsError(
                    f"the job server at {job_client.get_address()} had no agent to take the job for {waited:.0f} s "
                    f"(its head may still be starting, or its dashboard agent is down: `ray status` on the head); "
                    f"nothing was submitted. Try again, or wait longer with --agent-wait-s") from None
            say(f"the job server has no agent to take the job yet (a head still starting?); retrying in {delay:.0f} s "
                f"(waited {waited:.0f} s of at most {agent_wait_s:.0f} s)")
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


# ---- following a job


class JobServerLost(Exception):
    """The job server stopped answering while a job was followed (its head node gone, or the network)."""


def follow(job_client: Any, job_id: str, write: Callable[[str], None] = sys.stdout.write) -> Any:
    """Stream the job's logs until it ends; its final JobDetails. Raises JobServerLost if the server goes away."""

    async def tail() -> None:
        async for chunk in job_client.tail_job_logs(job_id):
            write(chunk)

    try:
        asyncio.run(tail())
        info = job_client.get_job_info(job_id)
        while str(info.status) not in TERMINAL:  # the log stream can close a moment before the status settles
            time.sleep(0.5)
            info = job_client.get_job_info(job_id)
        return info
    except Exception as err:  # aiohttp's, requests' and the SDK's errors alike: the server is gone
        if _answers(job_client):
            raise
        raise JobServerLost(
            f"lost the job server at {job_client.get_address()} while following job {job_id} "
            f"({type(err).__name__}). If its head node is gone, so is the job: a Ray cluster without GCS fault "
            f"tolerance does not outlive its head. The trials' checkpoints on ray.storage_path and the MLflow runs "
            f"are kept; on a running cluster, continue the sweep with: loraforge submit CONFIG [overrides] --resume"
        ) from None


def _answers(job_client: Any) -> bool:
    try:
        _probe(job_client.get_address(), None, timeout_s=5)  # any HTTP answer, a refusal included, means it is there
        return True
    except JobsError:
        return False


def exit_code(info: Any) -> int:
    """A job's exit status: its driver's exit code when it has one (2: a config the cluster refused)."""
    status = str(info.status)
    if status == "SUCCEEDED":
        return 0
    code = getattr(info, "driver_exit_code", None)
    return code if isinstance(code, int) and code > 0 else 1


def job_rows(job_client: Any) -> list[dict[str, Any]]:
    rows = []
    for job in sorted(job_client.list_jobs(), key=lambda j: j.start_time or 0, reverse=True):
        metadata = job.metadata or {}
        rows.append({
            "submission_id": job.submission_id or job.job_id, "status": str(job.status),
            "config": metadata.get("loraforge.config", ""),
            "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.start_time / 1000)) if job.start_time else "",
            "duration_s": round(((job.end_time or time.time() * 1000) - job.start_time) / 1000) if job.start_time else None,
            "entrypoint": job.entrypoint if len(job.entrypoint) <= 60 else job.entrypoint[:57] + "...",
        })
    return rows


def describe(info: Any) -> dict[str, Any]:
    return {"submission_id": info.submission_id, "status": str(info.status), "message": info.message,
            "driver_exit_code": getattr(info, "driver_exit_code", None), "metadata": info.metadata or {},
            "entrypoint": info.entrypoint,
            "secrets_forwarded": [k for k in ((info.runtime_env or {}).get("env_vars") or {}) if redact.is_secret_name(k)]}


def require_secrets(env: Mapping[str, str] | None = None) -> list[str]:
    """In the job: the secrets the submission named that the cluster does not supply."""
    env = os.environ if env is None else env
    return [n for n in env.get(SECRET_NAMES_VAR, "").split(",") if n and not env.get(n)]


def uploaded_overrides(pairs: list[str], cwd: Path | None = None) -> list[str]:
    """In the job: `KEY=REL` (inputs inside the upload) as overrides with absolute paths under the working dir."""
    cwd = cwd or Path.cwd()
    out = []
    for pair in pairs:
        key, _, rel = pair.partition("=")
        out.append(f"{key}={json.dumps(str(cwd / rel))}")
    return out
