"""`loraforge submit` and `loraforge jobs ...`: the command-line side of pipeline.jobs."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from pipeline.cli_common import fail_config

AddressOption = Annotated[Optional[str], typer.Option(
    "--address", help="The job server's URL, e.g. http://head:8265 (default: RAY_API_SERVER_ADDRESS, then RAY_ADDRESS).")]
JobIdArgument = Annotated[str, typer.Argument(metavar="SUBMISSION_ID", help="As `submit` printed it, or from `jobs list`.")]

jobs_app = typer.Typer(no_args_is_help=True, help="Ray jobs on a cluster: list, status, logs, stop.")


def _client(address: str | None) -> Any:
    from pipeline import jobs

    try:
        return jobs.client(address)
    except jobs.JobsError as err:
        fail_config(err)


def _follow(job_client: Any, job_id: str) -> Any:
    """Follow a job; a job server that went away is said plainly (exit 1), with what is kept and how to go on."""
    from pipeline import jobs

    try:
        return jobs.follow(job_client, job_id)
    except jobs.JobServerLost as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1)


def _call(what: str, fn: Any, *args: Any) -> Any:
    """A Jobs SDK call; an unknown submission id or a refused request exits 2 naming it."""
    from pipeline import redact

    try:
        return fn(*args)
    except RuntimeError as err:  # the SDK raises RuntimeError with the server's reply
        text = redact.redact_text(str(err))
        fail_config(f"{what}: {text}")


def submit(
    config_path: Annotated[Path, typer.Argument(metavar="CONFIG", help="Experiment YAML inside the working dir.")],
    overrides: Annotated[Optional[list[str]], typer.Argument(metavar="[KEY.SUB=VALUE]...", help="Config overrides.")] = None,
    address: AddressOption = None,
    follow: Annotated[bool, typer.Option("--follow", help="Stream the job's logs until it ends; exit with its status.")] = False,
    working_dir: Annotated[Path, typer.Option(help="The folder uploaded as the job's working dir.")] = Path("."),
    on_cluster: Annotated[Optional[list[str]], typer.Option(
        "--on-cluster", metavar="KEY", help="An input path (e.g. data.train_path) that the cluster has as written; "
        "not uploaded, not checked here.")] = None,
    forward_secret: Annotated[Optional[list[str]], typer.Option(
        "--forward-secret", metavar="NAME", help="Send this variable's value in the job's runtime env (visible to "
        "anyone holding the cluster's token). Default: only its name travels and the cluster supplies it.")] = None,
    entrypoint_num_cpus: Annotated[float, typer.Option(help="CPUs the job's driver holds, so it never takes a "
                                                       "trial's.")] = 1.0,
    submission_id: Annotated[Optional[str], typer.Option(help="Default: loraforge-<name>-<time>-<random>.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check the config and print what would be uploaded; "
                                          "submit nothing.")] = False,
    agent_wait_s: Annotated[float, typer.Option(help="How long to retry while the job server has no agent to take "
                                                "the job (a head still starting).", min=0)] = 120.0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the newest interrupted sweep of this config on "
                                         "ray.storage_path (after a lost head, a stopped job).")] = False,
) -> None:
    """Submit CONFIG as a Ray job: the working dir uploaded (what git would commit, the inputs the config names,
    no secret-looking files, nothing `.loraforgeignore` names), the config validated here first."""
    from pipeline import jobs
    from pipeline.config import ConfigError

    try:
        plan = jobs.plan_submission(config_path, overrides or [], working_dir=working_dir, on_cluster=on_cluster or [],
                                    forward_secrets=forward_secret or [], entrypoint_num_cpus=entrypoint_num_cpus,
                                    submission_id=submission_id, resume=resume)
    except (ConfigError, jobs.JobsError) as err:
        fail_config(err)
    for warning in plan.warnings:
        typer.echo(f"warning: {warning}", err=True)
    for name in forward_secret or []:
        typer.echo(f"warning: --forward-secret {name}: its value goes into the job's runtime env, which Ray's job "
                   "API shows to anyone holding the cluster's token", err=True)
    root = Path(plan.runtime_env["working_dir"])
    sizes = {f: (root / f).stat().st_size for f in plan.files}
    for name, size in sizes.items():
        typer.echo(f"  {size:>12,}  {name}", err=True)
    total = sum(sizes.values())
    typer.echo(f"{'would upload' if dry_run else 'uploading'} {len(sizes)} files ({total / 2**20:.1f} MiB) from {root}",
               err=True)
    if dry_run:
        return
    job_client = _client(address)
    try:
        job_id = _call("submit", lambda: jobs.submit(job_client, plan, agent_wait_s=agent_wait_s))
    except jobs.JobsError as err:
        fail_config(f"submit: {err}")
    typer.echo(job_id)
    if not follow:
        return
    info = _follow(job_client, job_id)
    typer.echo(f"job {job_id}: {info.status}", err=True)
    raise typer.Exit(jobs.exit_code(info))


@jobs_app.command("list")
def jobs_list(address: AddressOption = None) -> None:
    """The cluster's jobs, newest first."""
    from pipeline import jobs
    from pipeline.registry import tables

    job_client = _client(address)
    tables.print_rows(_call("list", jobs.job_rows, job_client), "Ray jobs")


@jobs_app.command("status")
def jobs_status(job_id: JobIdArgument, address: AddressOption = None,
                as_json: Annotated[bool, typer.Option("--json", help="The job's details as JSON.")] = False) -> None:
    """One job's status, message and metadata; exits 0 while it runs or after it succeeded, else its status."""
    from pipeline import jobs

    job_client = _client(address)
    info = _call(f"status {job_id}", job_client.get_job_info, job_id)
    details = jobs.describe(info)
    if as_json:
        typer.echo(json.dumps(details, indent=2, default=str))
    else:
        for key, value in details.items():
            typer.echo(f"{key}: {value}")
    if str(info.status) in jobs.TERMINAL:
        raise typer.Exit(jobs.exit_code(info))


@jobs_app.command("logs")
def jobs_logs(job_id: JobIdArgument, address: AddressOption = None,
              follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep streaming until the job ends.")] = False) -> None:
    """A job's driver logs."""
    from pipeline import jobs

    job_client = _client(address)
    if not follow:
        sys.stdout.write(_call(f"logs {job_id}", job_client.get_job_logs, job_id))
        return
    _call(f"logs {job_id}", job_client.get_job_info, job_id)  # an unknown id exits 2 before streaming
    info = _follow(job_client, job_id)
    raise typer.Exit(jobs.exit_code(info))


@jobs_app.command("stop")
def jobs_stop(job_id: JobIdArgument, address: AddressOption = None) -> None:
    """Stop a running job (its trials' checkpoints stay; `loraforge submit CONFIG --resume` continues it)."""
    job_client = _client(address)
    stopped = _call(f"stop {job_id}", job_client.stop_job, job_id)
    typer.echo(f"{job_id}: {'stop requested' if stopped else 'already ended'}")
