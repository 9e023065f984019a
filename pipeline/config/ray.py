"""`ray:`: the cluster to join and where trial state and checkpoints are kept."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator

from pipeline.config.base import StrictModel, is_uri


class RaySpec(StrictModel):
    address: str | None = Field(None, description="Cluster to join; RAY_ADDRESS overrides. None: a local instance.")
    num_cpus: int | None = Field(None, gt=0, description="CPUs of the local instance (default: all).")
    storage_path: Path | str = Field(Path("loraforge_results"), description=(
        "Where Ray Tune/Train keep trial state and checkpoints: a folder every node can write (local, NFS, a "
        "mounted volume), or an object store URI (s3://bucket/prefix, gs://...; pyarrow's options as a query, "
        "e.g. ?endpoint_override=host:port&scheme=http), kept as written. Credentials come from the environment."))
    warm_workers: bool = Field(True, description=(
        "Local instance only: start the next trials' worker processes (training stack imported) while "
        "the current ones train, so a trial does not wait for Python to start (see pipeline/warmpool.py)."))

    @field_validator("storage_path", mode="before")
    @classmethod
    def _uri_or_path(cls, value: object) -> object:
        # Path("s3://b/x") would be "s3:/b/x": a URI stays a string, anything else becomes a Path
        if is_uri(value):
            return value
        return Path(value) if isinstance(value, str) else value
