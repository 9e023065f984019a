"""Writes queued in an MLflow outbox while the server is away, and a replay that runs twice.

A replay that dies after sending and before rewriting its queue leaves every entry to be sent again;
`replay_twice` reproduces that (the queue and its artifact copies restored after the first drain), so a
test can check that each write still lands once, in SQLite (test_registry_units) and on the MLflow
server over HTTP with PostgreSQL behind it (test_tracking_server).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline import outbox, tracking

DEAD = "http://127.0.0.1:9"


def queue_writes(box: outbox.Outbox, run_id: str, scratch: Path) -> int:
    """What a trial logs while the server is away; returns the number of queued entries."""
    from mlflow.entities import Metric, Param

    dead = outbox.ResilientClient(tracking.raw_client(DEAD), box)
    dead.log_batch(run_id, metrics=[Metric("loss", 1.5, 1000, 1), Metric("loss", 1.2, 2000, 2)],
                   params=[Param("lr", "0.003")])
    dead.set_tag(run_id, "stage", "training")
    artifact = scratch / "note.txt"
    artifact.write_text("kept")
    dead.log_artifact(run_id, str(artifact), "notes")
    artifact.unlink()  # the caller's temp file is gone; the outbox kept a copy
    dead.log_text(run_id, "a: 1\n", "config.yaml")
    dead.set_terminated(run_id, "FINISHED")
    return 5  # metrics+params, the tag, two artifacts, the status


def replay_twice(box: outbox.Outbox, client: Any) -> list[tuple[int, int]]:
    """Drain into `client`, put the queue and its files back as a crash before the rewrite leaves them,
    drain again, then once more; returns each drain's (sent, left)."""
    queue = next(iter(box.queues()))
    unsent = queue.read_bytes()
    files = {p: p.read_bytes() for p in (box.root / outbox.FILES).rglob("*") if p.is_file()}
    first = box.drain(client)
    queue.write_bytes(unsent)
    for path, content in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return [first, box.drain(client), box.drain(client)]


def assert_landed_once(client: Any, run_id: str) -> None:
    run = client.get_run(run_id)
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(1, 1.5), (2, 1.2)]
    assert run.data.params == {"lr": "0.003"} and run.data.tags["stage"] == "training"
    assert run.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(run_id)} == {"notes", "config.yaml"}
    assert [a.path for a in client.list_artifacts(run_id, "notes")] == ["notes/note.txt"]
