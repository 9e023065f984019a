"""Fast checks of the registry's pieces: the promotion gate, redaction, safe names, the outbox's replay."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import outbox, redact, tracking
from pipeline.config import GateCondition, PromotionSpec, TrackingSpec
from pipeline.registry.promotion import check_gate


def gate(*conditions: dict) -> list[GateCondition]:
    return [GateCondition(**c) for c in conditions]


def test_gate_gain_drop_floor_and_direction():
    conditions = gate({"metric": "judge_single.score_mean", "min_gain": 0.2},
                      {"metric": "e2e_nlg.bleu", "max_drop": 0.005},
                      {"metric": "perplexity.perplexity", "direction": "lower", "max_drop": 0.5, "max": 30})
    champion = {"judge_single.score_mean": 6.0, "e2e_nlg.bleu": 0.60, "perplexity.perplexity": 10.0}
    good = {"judge_single.score_mean": 6.25, "e2e_nlg.bleu": 0.596, "perplexity.perplexity": 10.4}
    assert all(c.passed for c in check_gate(conditions, good, champion))
    # each condition failing on its own
    for metric, value in (("judge_single.score_mean", 6.1), ("e2e_nlg.bleu", 0.59), ("perplexity.perplexity", 10.6)):
        checks = check_gate(conditions, {**good, metric: value}, champion)
        assert [c.metric for c in checks if not c.passed] == [metric]
    # an absolute ceiling holds with no champion; relative conditions are skipped then
    checks = check_gate(conditions, {**good, "perplexity.perplexity": 31.0}, None)
    assert [(c.metric, c.condition) for c in checks if not c.passed] == [("perplexity.perplexity", "<= 30")]
    assert all("no champion" in c.detail for c in checks if c.condition.startswith(("gain", "drop")))
    # a metric the stage did not produce fails and names what there is
    missing = check_gate(gate({"metric": "classification.accuracy", "min": 0.5}), {"classification.f1": 0.9}, None)
    assert not missing[0].passed and "classification.f1" in missing[0].detail


def test_gate_config_is_checked():
    with pytest.raises(ValueError, match="give min_gain, max_drop, min or max"):
        GateCondition(metric="e2e_nlg.bleu")
    with pytest.raises(ValueError, match="exclude each other"):
        GateCondition(metric="e2e_nlg.bleu", min_gain=0.1, max_drop=0.1)
    with pytest.raises(ValueError, match="unknown suite"):
        PromotionSpec(gate=[{"metric": "glue.accuracy", "min": 0.5}])


@pytest.mark.parametrize("name", ["../escape", "a/../../b", "/abs/model", "a\\\\b", ".hidden"])
def test_names_that_could_traverse_paths_are_refused(name: str):
    with pytest.raises(ValueError, match=r"registered_model_name\n.*should match pattern"):
        TrackingSpec(registered_model_name=name)
    if name != ".hidden":  # a dot-name is a valid experiment name; the rest would escape or be absolute
        with pytest.raises(ValueError, match=r"experiment_name .* must not contain '\.\.', backslashes or be an absolute path"):
            TrackingSpec(experiment_name=name)
    TrackingSpec(experiment_name="plain name.v2")  # what is refused is traversal, not ordinary names


def test_redaction_masks_uri_credentials_secret_fields_and_env_values(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-live-abcdef123456")
    monkeypatch.setenv("MY_SERVICE_TOKEN", "tok-987654321")
    data = {"judge": {"base_url": "https://bob:hunter2hunter@api.example/v1", "api_key_env": "OPENAI_API_KEY"},
            "tracking": {"tracking_uri": "postgresql://u:pw@db/mlflow"}, "hf_token": "hf_abc",
            "note": "failed with key sk-live-abcdef123456 and tok-987654321",
            "eval": {"generation": {"max_new_tokens": 64}}, "password": ""}
    out = redact.redact(data)
    assert out["judge"]["base_url"] == "https://***@api.example/v1"
    assert out["judge"]["api_key_env"] == "OPENAI_API_KEY"  # the variable's name, not a secret
    assert out["tracking"]["tracking_uri"] == "postgresql://***@db/mlflow"
    assert out["hf_token"] == "***" and out["note"] == "failed with key *** and ***"
    assert out["eval"]["generation"]["max_new_tokens"] == 64


def test_outbox_queues_while_unreachable_and_replays_each_write_once(tmp_path: Path, monkeypatch):
    """Writes to a dead server wait on disk; replayed into a real store, twice, they land once."""
    from tests.support.outbox_replay import DEAD, assert_landed_once, queue_writes, replay_twice

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    store = tracking.raw_client(f"sqlite:///{tmp_path / 'm.db'}")
    experiment = store.create_experiment("x", artifact_location=(tmp_path / "art").as_uri())
    run_id = store.create_run(experiment).info.run_id
    box = outbox.Outbox(tmp_path / "outbox")
    queued = queue_writes(box, run_id, tmp_path)
    assert box.pending() == queued == 5
    assert box.drain(tracking.raw_client(DEAD)) == (0, 5)  # still away: nothing lost
    assert replay_twice(box, store) == [(5, 0), (5, 0), (0, 0)]
    assert_landed_once(store, run_id)
    assert box.sent_total() == 10
    assert not list((tmp_path / "outbox" / outbox.FILES).iterdir())  # copies removed once sent


def test_loraforge_mlflow_sync_sends_what_a_run_queued_and_says_what_is_left(tmp_path: Path, monkeypatch):
    from typer.testing import CliRunner

    from pipeline.cli import app
    from tests.support.outbox_replay import DEAD, assert_landed_once, queue_writes

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    store = tracking.raw_client(uri)
    run_id = store.create_run(store.create_experiment("x", artifact_location=(tmp_path / "art").as_uri())).info.run_id
    box = outbox.Outbox(tmp_path / "outbox")
    queued = queue_writes(box, run_id, tmp_path)
    runner = CliRunner()

    out = runner.invoke(app, ["mlflow", "sync", str(tmp_path / "outbox"), "--tracking-uri", DEAD])
    assert out.exit_code == 1 and "sent 0 queued writes" in out.output and f"{queued} left" in out.output
    assert "still unreachable" in out.output
    out = runner.invoke(app, ["mlflow", "sync", str(tmp_path / "outbox"), "--tracking-uri", uri])
    assert out.exit_code == 0, out.output
    assert f"sent {queued} queued writes" in out.output and "0 left" in out.output
    assert_landed_once(store, run_id)
    assert box.pending() == 0
    out = runner.invoke(app, ["mlflow", "sync", str(tmp_path / "nowhere"), "--tracking-uri", uri])
    assert out.exit_code == 2 and "OUTBOX_DIR" in out.output and "Traceback" not in out.output


def test_a_torn_queue_line_is_set_aside_and_every_whole_entry_still_lands(tmp_path: Path, monkeypatch):
    """What a kill or a full disk leaves mid-write: the rest replays, the torn lines are kept and counted."""
    from typer.testing import CliRunner

    from pipeline.cli import app
    from tests.support.outbox_replay import assert_landed_once, queue_writes

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    store = tracking.raw_client(uri)
    run_id = store.create_run(store.create_experiment("x", artifact_location=(tmp_path / "art").as_uri())).info.run_id
    box = outbox.Outbox(tmp_path / "outbox")
    queue_writes(box, run_id, tmp_path)
    whole = box.mine.read_bytes()
    # another process's queue, killed while appending a sixth entry
    other = box.root / "otherhost-4242.jsonl"
    other.write_bytes(whole + b'{"id": "x", "op": "log_batch", "run_id": "' + run_id.encode())
    # this process's queue, cut mid-line by a full disk; the next write must not be glued to the stub
    box.mine.write_bytes(b'{"id": "y", "op": "set_t')
    box.put("log_batch", run_id=run_id, metrics=[], params=[], tags=[["after", "1"]])

    out = CliRunner().invoke(app, ["mlflow", "sync", str(box.root), "--tracking-uri", uri])
    assert out.exit_code == 0, out.output
    assert "sent 6 queued writes" in out.output and "0 left" in out.output
    assert "2 queued line(s) were cut short" in out.output and outbox.TORN in out.output
    assert_landed_once(store, run_id)
    assert store.get_run(run_id).data.tags["after"] == "1"
    assert box.torn_total() == 2 and not other.exists() and box.pending() == 0
    assert (box.root / outbox.TORN).read_bytes().count(run_id.encode()) == 1  # kept as it was


def test_a_second_sweep_of_the_same_name_gets_a_suffix_never_the_first_ones_state(tmp_path: Path):
    from pipeline.storage import Storage
    from pipeline.sweep import unique_run_name

    store = Storage.of(str(tmp_path / "results"))
    store.mkdirs(store.root)
    assert unique_run_name(store, "exp") == "exp"
    store.mkdirs(store.path("exp"))
    assert unique_run_name(store, "exp") == "exp-2"
    store.mkdirs(store.path("exp-2"))
    store.mkdirs(store.path("exp-4"))
    assert unique_run_name(store, "exp") == "exp-3"


def test_promote_refuses_an_empty_gate_and_an_unexplained_force(tmp_path: Path, sst2_small):
    from pipeline.config import ConfigError, load_config
    from pipeline.registry import promotion
    from tests.support.configs import minilm_config, write_yaml

    config = load_config(write_yaml(tmp_path / "c.yaml", minilm_config(tmp_path, sst2_small)), env={})
    with pytest.raises(ConfigError, match="registry.promotion.gate: empty"):
        promotion.promote(config)
    with pytest.raises(ConfigError, match="give --reason"):
        promotion.promote(config, force=True, reason="  ")


def promotion_store(tmp_path: Path, sst2_small, gate_conditions: list[dict]):
    """A real SQLite registry with versions 1-3 of the config's model: champion on 1, candidate on 2."""
    from pipeline.config import load_config
    from tests.support.configs import minilm_config, write_yaml

    raw = minilm_config(tmp_path, sst2_small, registry={"promotion": {"gate": gate_conditions}})
    config = load_config(write_yaml(tmp_path / "c.yaml", raw), env={})
    client = tracking.client(config.tracking.tracking_uri)
    name = config.tracking.registered_model_name
    client.create_registered_model(name)
    for _ in range(3):
        client.create_model_version(name, source=(tmp_path / "model").as_uri())
    client.set_registered_model_alias(name, "champion", "1")
    client.set_registered_model_alias(name, "candidate", "2")
    return config, client, name


def test_promotion_records_first_and_moves_the_alias_last(tmp_path: Path, sst2_small, monkeypatch):
    """An error while recording leaves `champion` where it was; a promote that completes can be rolled back."""
    from mlflow.tracking import MlflowClient

    from pipeline.registry import promotion

    config, client, name = promotion_store(tmp_path, sst2_small, [])
    real_update = MlflowClient.update_model_version

    def store_gone(self, *args, **kwargs):
        raise ConnectionError("the registry went away mid-promotion")

    monkeypatch.setattr(MlflowClient, "update_model_version", store_gone)
    with pytest.raises(ConnectionError):
        promotion.promote(config, force=True, reason="drill")
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"  # nothing moved unrecorded

    monkeypatch.setattr(MlflowClient, "update_model_version", real_update)
    decision = promotion.promote(config, force=True, reason="drill")
    assert decision.promoted and str(client.get_model_version_by_alias(name, "champion").version) == "2"
    assert client.get_model_version(name, "2").tags[promotion.PREVIOUS_TAG] == "1"
    promotion.rollback(config, reason="drill over")
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"


def test_a_promote_that_lost_a_race_moves_nothing_and_says_so(tmp_path: Path, sst2_small, monkeypatch):
    """While this promote evaluates, another moves `champion` to version 3: this one refuses, 3 stays."""
    from pipeline.config import ConfigError
    from pipeline.registry import promotion

    config, client, name = promotion_store(tmp_path, sst2_small, [{"metric": "classification.accuracy", "min": 0.5}])

    def evaluate_while_another_promotes(config, candidate, champion, suites):
        client.set_registered_model_alias(name, "champion", "3")  # the other promote finishes first
        return {"suites": {"classification": {"candidate": {"accuracy": 0.9}, "champion": {"accuracy": 0.8}}},
                "_run_id": None}

    monkeypatch.setattr(promotion, "evaluate", evaluate_while_another_promotes)
    with pytest.raises(ConfigError, match="champion: moved to version 3 while this decision was made against version 1"):
        promotion.promote(config)
    assert str(client.get_model_version_by_alias(name, "champion").version) == "3"
    assert "loraforge.promotion.decision" not in client.get_model_version(name, "2").tags
