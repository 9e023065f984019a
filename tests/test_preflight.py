"""Bad inputs that need the model skeleton, the data files, the cluster's size or the tracking store.

All are rejected before any Ray worker starts; the CLI turns them into exit code 2
with one message and no traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import preflight, sweep, tracking
from pipeline.config import ConfigError, load_config
from tests.support.configs import REPO, minilm_config, write_yaml


def load(tmp_path: Path, config: dict, overrides: list[str] | None = None):
    return load_config(write_yaml(tmp_path / "c.yaml", config), overrides or [], env={})


def preflight_message(tmp_path: Path, config: dict, overrides: list[str] | None = None) -> str:
    cfg = load(tmp_path, config, overrides)
    with pytest.raises(ConfigError) as info:
        preflight.check(cfg, sweep.candidate_configs(cfg))
    return str(info.value)


@pytest.fixture()
def base(tmp_path: Path, sst2_small) -> dict:
    return minilm_config(tmp_path, sst2_small)


def test_valid_config_passes_and_counts_rows(tmp_path: Path, base: dict):
    cfg = load(tmp_path, base)
    summary = preflight.check(cfg, sweep.candidate_configs(cfg))
    assert (summary.train_rows, summary.eval_rows) == (160, 64)


def test_each_unknown_target_is_named_with_close_matches(tmp_path: Path, base: dict):
    # a typo next to a valid name: PEFT alone would silently ignore it
    message = preflight_message(tmp_path, base, ["lora.target_modules=[query, valeu, kye]"])
    assert "lora.target_modules: 'valeu' matches no module of the model; did you mean 'value'" in message
    assert "'kye' matches no module" in message and "'key'" in message
    assert "'query'" not in message.split("did you mean")[0].split("lora.target_modules: ")[1]


def test_swept_target_sets_are_checked_too(tmp_path: Path, base: dict):
    base["sweep"]["parameters"] = {"lora.target_modules": {"grid": [["query", "value"], ["q_proj", "v_proj"]]}}
    message = preflight_message(tmp_path, base)
    assert "sweep.parameters.lora.target_modules: 'q_proj' matches no module" in message


def test_unsupported_module_type_is_rejected(tmp_path: Path, base: dict):
    message = preflight_message(tmp_path, base, ["lora.target_modules=[LayerNorm]"])
    assert "'LayerNorm' matches only LayerNorm modules, which LoRA cannot wrap" in message


def test_missing_dataset_file(tmp_path: Path, base: dict):
    base["data"]["train_path"] = str(tmp_path / "nope.jsonl")
    assert f"data.train_path: file '{tmp_path / 'nope.jsonl'}' not found" in preflight_message(tmp_path, base)


def test_missing_column_lists_columns_and_fix(tmp_path: Path, base: dict):
    message = preflight_message(tmp_path, base, ["data.text_field=text"])
    assert "missing column 'text' (columns present: ['label', 'sentence']); set data.text_field to one of them" in message


def test_empty_dataset(tmp_path: Path, base: dict):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    base["data"]["eval_path"] = str(empty)
    assert "data.eval_path" in (message := preflight_message(tmp_path, base)) and "no rows" in message


def test_wrong_types_and_labels_name_the_first_bad_row(tmp_path: Path, base: dict):
    rows = [{"sentence": "good", "label": 1}, {"sentence": "bad", "label": 0}, {"sentence": "odd", "label": 7}]
    path = tmp_path / "labels.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base["data"]["train_path"] = str(path)
    assert "row 2: label 7 outside [0, 2)" in preflight_message(tmp_path, base)
    rows[1]["sentence"] = 3
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert "row 1: column 'sentence' must be str, got 3" in preflight_message(tmp_path, base)


def test_all_rows_empty(tmp_path: Path, base: dict):
    path = tmp_path / "blank.jsonl"
    path.write_text("".join(json.dumps({"sentence": " ", "label": 0}) + "\n" for _ in range(3)))
    base["data"]["train_path"] = str(path)
    assert "all 3 rows have empty text" in preflight_message(tmp_path, base)


def test_seq_len_above_model_max_and_truncation(tmp_path: Path, base: dict):
    assert "data.max_seq_len=1024 exceeds the model's max_position_embeddings=512" in preflight_message(
        tmp_path, base, ["data.max_seq_len=1024"])
    message = preflight_message(tmp_path, base, ["data.max_seq_len=4"])
    assert "data.max_seq_len=4 truncates" in message and "above data.max_truncated_fraction=0.05" in message


def test_remote_code_and_pickle_only_models_are_refused(tmp_path: Path, base: dict):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "bert", "auto_map": {"AutoModel": "x.Y"}}))
    base["model"]["name_or_path"] = str(model_dir)
    assert "needs its own code (auto_map); set model.trust_remote_code" in preflight_message(tmp_path, base)
    (model_dir / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (model_dir / "pytorch_model.bin").write_bytes(b"\x80\x02")
    assert "has no .safetensors weights; loraforge never unpickles .bin files" in preflight_message(tmp_path, base)


@pytest.mark.parametrize(
    ("train", "resources", "expected"),
    [
        ({"num_workers": 3}, sweep.Resources(2, 0, 2, 0), "train.num_workers=3 x train.cpus_per_worker=1 = 3 CPUs per trial, but the cluster has 2"),
        ({"gpus_per_worker": 1}, sweep.Resources(8, 0, 8, 0), "train.gpus_per_worker=1 but the largest node has 0 GPUs"),
        ({"cpus_per_worker": 4}, sweep.Resources(8, 0, 2, 0), "train.cpus_per_worker=4 but the largest node has 2 CPUs"),
    ],
)
def test_trials_that_cannot_fit_are_refused(tmp_path: Path, base: dict, train: dict, resources, expected: str):
    base["train"].update(train)
    cfg = load(tmp_path, base)
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        sweep.plan_concurrency(sweep.candidate_configs(cfg), resources, None)


def test_concurrency_follows_real_resources(tmp_path: Path, base: dict):
    cfg = load(tmp_path, base)
    configs = sweep.candidate_configs(cfg)
    assert sweep.plan_concurrency(configs, sweep.Resources(2, 0, 2, 0), None) == 2
    assert sweep.plan_concurrency(configs, sweep.Resources(64, 0, 16, 0), None) == 64
    cfg = load(tmp_path, base, ["train.num_workers=2", "train.gpus_per_worker=0.5"])
    assert sweep.plan_concurrency(sweep.candidate_configs(cfg), sweep.Resources(64, 8, 16, 8), None) == 8
    with pytest.raises(ConfigError, match="sweep.max_concurrent_trials=3 but only 2 trial"):
        sweep.plan_concurrency(configs, sweep.Resources(2, 0, 2, 0), 3)


def test_unreachable_tracking_uri_fails_fast(tmp_path: Path):
    with pytest.raises(ConfigError, match="MLflow tracking URI unreachable: http://127.0.0.1:9"):
        tracking.preflight("http://127.0.0.1:9", "x")
    with pytest.raises(ConfigError, match="does not exist"):
        tracking.preflight(f"sqlite:///{tmp_path}/missing/dir/m.db", "x")


def test_deleted_experiment_is_named_with_the_fix(tmp_path: Path):
    uri = f"sqlite:///{tmp_path}/m.db"
    experiment_id = tracking.preflight(uri, "gone")
    tracking.client(uri).delete_experiment(experiment_id)
    with pytest.raises(ConfigError, match="experiment 'gone' is deleted; restore it"):
        tracking.preflight(uri, "gone")


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "run", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=180)


def test_cli_exit_code_2_no_traceback_nothing_started(tmp_path: Path, base: dict):
    path = write_yaml(tmp_path / "c.yaml", base)
    for overrides, expected in (
        (["lora.r=0"], "lora.r must be a positive int, got 0"),
        (["lora.target_modules=[query, valeu]"], "'valeu' matches no module of the model; did you mean 'value'"),
        (["train.num_workers=64"], "CPUs per trial, but the cluster has"),
    ):
        result = run_cli(str(path), *overrides, cwd=tmp_path)
        assert result.returncode == 2, result.stderr[-2000:]
        assert expected in result.stderr
        assert "Traceback" not in result.stderr + result.stdout
    # nothing was started or written: no trial state, no MLflow runs
    assert not (tmp_path / "ray_results").exists()
    if (tmp_path / "mlruns.db").exists():
        assert tracking.client(f"sqlite:///{tmp_path / 'mlruns.db'}").search_runs(
            [tracking.client(f"sqlite:///{tmp_path / 'mlruns.db'}").get_experiment_by_name("tests").experiment_id]) == []


def test_cli_missing_config_file(tmp_path: Path):
    result = run_cli(str(tmp_path / "nope.yaml"), cwd=REPO)
    assert result.returncode == 2 and "not found" in result.stderr and "Traceback" not in result.stderr


def test_any_labelled_csv_runs_by_config_alone(tmp_path: Path, base: dict):
    import csv

    path = tmp_path / "reviews.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["review", "stars"])
        for i in range(30):
            writer.writerow([f"review number {i} was {'great' if i % 3 else 'awful'}", i % 3])
    base["data"].update({"train_path": str(path), "eval_path": str(path), "text_field": "review",
                         "label_field": "stars", "num_labels": 3})
    cfg = load(tmp_path, base)
    assert preflight.check(cfg, sweep.candidate_configs(cfg)).train_rows == 30
    message = preflight_message(tmp_path, base, ["data.num_labels=2"])
    assert "label 2 outside [0, 2)" in message


@pytest.mark.parametrize("preset", ["attention_qv", "attention_all", "attention_mlp", "all_linear"])
def test_target_presets_resolve_against_the_real_model(tmp_path: Path, base: dict, preset: str, caplog):
    import logging

    cfg = load(tmp_path, base, [f"lora.target_modules={preset}"])
    with caplog.at_level(logging.INFO, logger="loraforge"):
        assert preflight.check_targets(cfg, [cfg]) == []
    assert f"preset {preset} -> " in caplog.text and "model type bert" in caplog.text  # shown to the user
    from pipeline import adapters

    model = adapters.attach_lora(adapters.load_base_model(cfg.model, cfg.data), cfg.lora, cfg.data)
    wrapped = {name.rsplit(".", 1)[0] for name, _ in model.named_parameters() if "lora_A" in name}
    expected_layers = {"attention_qv": 12, "attention_all": 24, "attention_mlp": 36, "all_linear": 36}[preset]
    assert len(wrapped) == expected_layers  # 6 layers x (2 | 4 | 6 | 6) linear modules


def test_workload_line_counts_trial_steps_and_bounds_device_hours(tmp_path: Path, base: dict):
    # 160 rows, batch 16 -> 10 steps per epoch; 2 epochs; 4 trials
    cfg = load(tmp_path, base, ["train.epochs=2"])
    configs = sweep.candidate_configs(cfg)
    line = sweep.workload(configs, 160, 4, 2, None)
    assert line.startswith("4 trials x <= 20 optimizer steps = <= 80 trial-steps; 1 CPU(s) per trial, 2 at a time")
    assert "set sweep.time_budget_s to cap it" in line
    cfg = load(tmp_path, base, ["train.num_workers=2", "train.gpus_per_worker=0.5"])
    line = sweep.workload(sweep.candidate_configs(cfg), 160, 4, 2, 3600)
    # 2 workers share each batch: 5 steps per epoch; 2 at a time x 1 GPU x 1 h
    assert line == ("4 trials x <= 5 optimizer steps = <= 20 trial-steps; 1 GPU(s) per trial, 2 at a time; "
                    "<= 2.00 GPU-hours (sweep.time_budget_s)")


def alias_bomb(levels: int = 9) -> str:
    """A few hundred bytes of nested YAML aliases that expand to 9**levels values ("billion laughs")."""
    lines = ['a0: &a0 ["x","x","x","x","x","x","x","x","x"]']
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def bad_input_cases(tmp_path: Path, base: dict) -> dict[str, tuple[list[str], list[str]]]:
    """Case -> (loraforge arguments, texts the error must hold). Each file is written here."""
    cases: dict[str, tuple[list[str], list[str]]] = {}
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(alias_bomb())
    cases["alias bomb"] = (["run", str(bomb)], [str(bomb), "aliases", "expand to more than"])
    cases["alias bomb in an override"] = (
        ["run", str(write_yaml(tmp_path / "ok.yaml", base)), "lora.target_modules=" + alias_bomb().replace("\n", ", ")
         .join(["{", "}"])], ["override lora.target_modules", "expand to more than"])
    huge = tmp_path / "huge.yaml"
    huge.write_text("# " + "x" * (2 << 20) + "\nname: x\n")
    cases["huge config"] = (["run", str(huge)], [str(huge), "a config is at most"])
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"name: test\n# caf\xe9\n")
    cases["config not UTF-8"] = (["run", str(latin1)], [str(latin1), "line 2 is not UTF-8"])

    rows = Path(base["data"]["train_path"]).read_bytes().splitlines(keepends=True)
    not_utf8 = tmp_path / "not_utf8.jsonl"
    not_utf8.write_bytes(b"".join(rows[:2]) + rows[2].replace(b'"sentence": "', b'"sentence": "caf\xe9 ') + b"".join(rows[3:]))
    cut = tmp_path / "cut.jsonl"
    cut.write_bytes(b"".join(rows[:-1]) + rows[-1][: len(rows[-1]) // 2])
    for name, path, expected in (("data row not UTF-8", not_utf8, ["line 3 is not UTF-8"]),
                                 ("data file cut short", cut, [f"line {len(rows)} is not a complete JSON row",
                                                               "the file was cut short"])):
        config = {**base, "data": {**base["data"], "train_path": str(path)}}
        cases[name] = (["run", str(write_yaml(tmp_path / f"{path.stem}.yaml", config))],
                       ["data.train_path", str(path), *expected])

    config_path = str(write_yaml(tmp_path / "export.yaml", base))
    cases["export of a missing model"] = (["export", config_path, "--out", str(tmp_path / "merged")],
                                          ["models:/test-sst2-lora@candidate: not in", "loraforge models"])
    root = tmp_path / "data-root"
    (root / "sst2" / "train.jsonl").mkdir(parents=True)
    cases["data fetch onto a folder"] = (["data", "fetch", "sst2", "--root", str(root)],
                                         [f"{root / 'sst2' / 'train.jsonl'}: a folder where the data manifest puts the file"])
    sweep_dir = Path(base["ray"]["storage_path"]) / base["name"]  # a sweep whose run state a crash cut short
    sweep_dir.mkdir(parents=True)
    (sweep_dir / "tuner.pkl").write_bytes(b"")  # all Tune's can_restore looks for
    (sweep_dir / "loraforge_run.json").write_text('{"experiment_id": "1", "parent_run_id": "ab')
    cases["run state cut short"] = (["run", config_path, "--resume"],
                                    [f"--resume: {sweep_dir / 'loraforge_run.json'} is unreadable", "start afresh"])
    from tests.support.ray_cluster import free_port

    gone = f"127.0.0.1:{free_port()}"  # a head that is gone: ray.init would retry it forever
    cases["a cluster that is gone"] = (["run", config_path, f"ray.address={gone}"],
                                       [f"ray.address {gone}: nothing answers there", "RAY_ADDRESS"])
    return cases


BAD_INPUTS = ["alias bomb", "alias bomb in an override", "huge config", "config not UTF-8", "data row not UTF-8",
              "data file cut short", "export of a missing model", "data fetch onto a folder", "a cluster that is gone",
              "run state cut short"]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_exits_2_naming_the_file_row_or_key_at_once(case: str, tmp_path: Path, base: dict):
    import time

    from typer.testing import CliRunner

    from pipeline.cli import app

    args, expected = bad_input_cases(tmp_path, base)[case]
    began = time.perf_counter()
    result = CliRunner().invoke(app, args, env={"HF_HUB_OFFLINE": "1", "RAY_ADDRESS": "",
                                                "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"})
    took = time.perf_counter() - began
    output = " ".join(result.output.split())
    assert result.exit_code == 2, result.output[-3000:]
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    for text in expected:
        assert " ".join(text.split()) in output, output[-3000:]
    assert "Traceback" not in result.output
    if case.startswith(("alias", "huge")):
        assert took < 5, f"{took:.1f} s to refuse it"


def test_a_database_store_that_is_down_or_silent_is_reported_in_under_30_s(tmp_path: Path):
    """MLflow's own engine retries a down database for about 110 s; the preflight probes it once, with a timeout."""
    import socket
    import time

    from tests.support.ray_cluster import free_port

    with socket.socket() as silent:  # accepts connections (the kernel's backlog) and never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        for port, reason in ((free_port(), "Connection refused"), (silent.getsockname()[1], "timeout")):
            uri = f"postgresql://loraforge:s3cret-pw@127.0.0.1:{port}/mlflow"
            began = time.perf_counter()
            with pytest.raises(ConfigError) as info:
                tracking.preflight(uri, "x")
            took = time.perf_counter() - began
            assert took < 30, f"{took:.0f} s"
            text = str(info.value)
            assert f"the database postgresql://***@127.0.0.1:{port}/mlflow does not answer" in text, text
            assert reason in text and "s3cret-pw" not in text, text
