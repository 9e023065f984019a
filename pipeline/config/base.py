"""What every section shares: the error a user can fix, the strict base model, name and URI checks."""

from __future__ import annotations

import math
import re

from pydantic import BaseModel, ConfigDict


class ConfigError(Exception):
    """A config problem a user can fix; carries every problem found, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))

    def __str__(self) -> str:
        head = "invalid config" if len(self.problems) == 1 else f"invalid config ({len(self.problems)} problems)"
        return head + ":\n" + "\n".join(f"  - {p}" for p in self.problems)


class StrictModel(BaseModel):
    """Base for all specs: unknown keys are errors, assignments are re-validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def finite_positive(value: float, name: str) -> float:
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


SAFE_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"  # a name that is also a path component: no '/', no leading '.'


def no_traversal(value: str, field: str) -> str:
    """Names that become file or artifact paths: MLflow's path-traversal CVEs came from '..' and absolute names."""
    if ".." in value or value.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", value) or "\\" in value:
        raise ValueError(f"{field} {value!r} must not contain '..', backslashes or be an absolute path")
    return value


def is_uri(value: object) -> bool:
    """`s3://bucket/x`, `gs://...`, `file:///...`: a location for pyarrow.fs, not a local path."""
    return isinstance(value, str) and re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", value) is not None
