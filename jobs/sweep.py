"""Entrypoint for `ray job submit`: run one experiment config on the cluster the job runs in.

    ray job submit --working-dir . -- python jobs/sweep.py configs/quickstart.yaml [key.sub=value ...]

Inside a Ray job, RAY_ADDRESS points at the cluster, so the pipeline joins it
instead of starting a local instance. Exit codes: 0 done, 2 bad config, 1 failed.
"""

from __future__ import annotations

import sys
from pathlib import Path

# `--working-dir .` ships the repo; make its `pipeline` importable without installing it
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.cli import app  # noqa: E402

if __name__ == "__main__":
    sys.exit(app(["run", *sys.argv[1:]]))
