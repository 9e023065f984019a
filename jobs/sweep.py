"""Entrypoint for a Ray job: run one experiment config on the cluster the job runs in.

    loraforge submit configs/quickstart.yaml --address http://head:8265 [key.sub=value ...]
    ray job submit --working-dir . -- python jobs/sweep.py configs/quickstart.yaml [key.sub=value ...]

Inside a Ray job, RAY_ADDRESS points at the cluster, so the pipeline joins it instead of
starting a local instance. `--uploaded KEY=REL` (written by `loraforge submit`) names an input
file inside the uploaded working dir; it is resolved against the job's working dir here.
Exit codes: 0 done, 2 bad config or a secret the cluster does not supply, 1 failed.
"""

from __future__ import annotations

import sys
from pathlib import Path

# `--working-dir .` ships the repo; make its `pipeline` importable without installing it
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import jobs  # noqa: E402
from pipeline.cli import app  # noqa: E402


def main(argv: list[str]) -> int:
    uploaded = []
    while len(argv) >= 2 and argv[0] == "--uploaded":
        uploaded.append(argv[1])
        argv = argv[2:]
    if missing := jobs.require_secrets():
        print(f"error: the job needs {', '.join(missing)} and the cluster does not set "
              f"{'it' if len(missing) == 1 else 'them'}: supply {'it' if len(missing) == 1 else 'them'} on the cluster "
              "(KubeRay: env from a Secret, secretKeyRef; see cluster/kuberay/raycluster.yaml), or submit with "
              + " ".join(f"--forward-secret {m}" for m in missing), file=sys.stderr)
        return 2
    if not argv:
        print("usage: jobs/sweep.py [--uploaded KEY=REL ...] CONFIG [KEY.SUB=VALUE ...]", file=sys.stderr)
        return 2
    return app(["run", argv[0], *argv[1:], *jobs.uploaded_overrides(uploaded)])  # exits with the run's status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
