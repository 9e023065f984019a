"""`loraforge run` as a separate driver process, the way a user starts it, for the tests that kill it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from pipeline import tracking

REPO = Path(__file__).resolve().parents[2]


def loraforge_run(*args: str, cwd: Path, env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
    """`python -m pipeline.cli run ARGS` with this checkout on the path, its output piped."""
    full = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    full.pop("RAY_ADDRESS", None)
    full.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", *args], cwd=cwd, env=full,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def trial_runs(tracking_uri: str, experiment: str) -> list:
    """The MLflow runs of an experiment's trials (none while the experiment does not exist yet)."""
    client = tracking.client(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    return client.search_runs([found.experiment_id], "tags.`loraforge.trial_id` != ''")
