"""Schema-level bad inputs: rejected at config load with the key named, before anything starts."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, ExperimentConfig, load_config, parse_overrides
from tests.support.configs import REPO, minilm_config, write_yaml


@pytest.fixture()
def base(tmp_path: Path, sst2_small) -> dict:
    return minilm_config(tmp_path, sst2_small)


def problems_for(tmp_path: Path, config: dict, overrides: list[str] | None = None) -> str:
    path = write_yaml(tmp_path / "c.yaml", config)
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides or [], env={})
    return str(info.value)


def test_quickstart_config_loads():
    config = load_config(REPO / "configs" / "quickstart.yaml", env={"LORAFORGE_DATA_ROOT": str(REPO / "data")})
    assert config.sweep.trial_count() == 4
    assert config.data.train_path == REPO / "data" / "sst2" / "train.jsonl" and config.data.train_path.is_file()
    assert Path(config.model.resolve(), "config.json").is_file()
    assert config.tracking.tracking_uri.startswith("sqlite:////")


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("lora.r=0", "lora.r must be a positive int, got 0"),
        ("lora.r=-4", "lora.r must be a positive int, got -4"),
        ("lora.r=2.5", "lora.r must be a positive int, got 2.5"),
        ("lora.alpha=0", "lora.alpha must be > 0"),
        ("lora.alpha=.nan", "lora.alpha must be > 0"),
        ("lora.dropout=1.0", "lora.dropout must satisfy 0 <= p < 1"),
        ("lora.dropout=-0.1", "lora.dropout must satisfy 0 <= p < 1"),
        ("lora.target_modules=[]", "lora.target_modules must be a non-empty list"),
        ("train.lr=0", "train.lr must be a finite number > 0"),
        ("train.lr=-1e-3", "train.lr must be a finite number > 0"),
        ("train.lr=.nan", "train.lr must be a finite number > 0"),
        ("train.epochs=0", "train.epochs: Input should be greater than 0"),
        ("train.grad_accum=0", "train.grad_accum: Input should be greater than 0"),
        ("train.num_workers=0", "train.num_workers: Input should be greater than 0"),
        ("train.lr_scheduler=cosine_restarts", "train.lr_scheduler: Input should be 'linear', 'cosine' or 'constant'"),
        ("train.optimizer=sgd", "train.optimizer: Input should be 'adamw'"),
        ("sweep.searcher=hyperopt", "sweep.searcher: Input should be 'grid', 'random' or 'optuna'"),
        ("sweep.scheduler=pbt2", "sweep.scheduler: Input should be 'asha', 'median', 'fifo' or 'pbt'"),
        ("sweep.num_samples=0", "sweep.num_samples: Input should be greater than 0"),
        ("data.num_labels=1", "data.num_labels: Input should be greater than or equal to 2"),
        ("data.train_path=train.parquet", "data.train_path: must be a .jsonl, .json or .csv file"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, base: dict, override: str, expected: str):
    message = problems_for(tmp_path, base, [override])
    assert expected in message, message


def test_unknown_keys_at_every_level(tmp_path: Path, base: dict):
    base["train"]["learning_rte"] = 0.1
    base["lora"]["rank"] = 8
    base["colour"] = "blue"
    message = problems_for(tmp_path, base)
    assert "train.learning_rte: unknown key; remove it or fix the spelling" in message
    assert "lora.rank: unknown key" in message
    assert "colour: unknown key" in message
    assert "3 problems" in message  # every problem at once, not the first only


def test_unknown_key_reports_yaml_line(tmp_path: Path, base: dict):
    text = yaml.safe_dump(base, sort_keys=False).replace("  lr: 0.003\n", "  lr: 0.003\n  learning_rte: 1\n")
    path = tmp_path / "c.yaml"
    path.write_text(text)
    line = text.splitlines().index("  learning_rte: 1") + 1
    with pytest.raises(ConfigError, match=rf"train.learning_rte: unknown key.*\(line {line}\)"):
        load_config(path, env={})


def test_yaml_tags_are_refused_not_executed(tmp_path: Path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.yaml"
    path.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match=r"YAML error at line 1.*tags such as !!python/object are not allowed"):
        load_config(path, env={})
    assert not marker.exists()


def test_malformed_yaml_gives_line_and_column(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nlora:\n  r: [1, 2\n")
    with pytest.raises(ConfigError, match=r"YAML error at line \d+, column \d+"):
        load_config(path, env={})


def test_missing_required_sections(tmp_path: Path):
    message = problems_for(tmp_path, {"name": "x"})
    assert "model: required; add it" in message and "data: required; add it" in message


def test_sweep_values_are_validated_like_config_values(tmp_path: Path, base: dict):
    base["sweep"]["parameters"] = {"lora.r": {"grid": [4, 0]}, "train.lr": {"grid": [1e-3, -1.0]}}
    message = problems_for(tmp_path, base)
    assert "sweep.parameters.lora.r: value 0: lora.r must be a positive int, got 0" in message
    assert "sweep.parameters.train.lr: value -1.0: train.lr must be a finite number > 0" in message


def test_sweep_space_shape_errors(tmp_path: Path, base: dict):
    base["sweep"] = {"searcher": "random", "parameters": {"train.lr": {"loguniform": [1e-2, 1e-4]}}}
    assert "loguniform lower bound must be < upper bound" in problems_for(tmp_path, base)
    base["sweep"] = {"searcher": "random", "parameters": {"train.lr": {"loguniform": [0, 1e-2]}}}
    assert "loguniform bounds must be > 0" in problems_for(tmp_path, base)
    base["sweep"] = {"searcher": "grid", "parameters": {"train.lr": {"uniform": [1e-4, 1e-2]}}}
    assert "searcher 'grid' takes only `grid:` or `pow2:`" in problems_for(tmp_path, base)
    base["sweep"] = {"searcher": "grid", "parameters": {"lora.r": {"pow2": [8, 2]}}}
    assert "pow2 bounds must satisfy 1 <= lo <= hi" in problems_for(tmp_path, base)
    base["sweep"] = {"searcher": "optuna", "parameters": {"lora.r": {"grid": [2, 4]}}}
    assert "searcher 'optuna' cannot take `grid:`; use `choice:` instead" in problems_for(tmp_path, base)
    base["sweep"] = {"parameters": {"lora.rank": {"grid": [2, 4]}}}
    assert "sweep.parameters.lora.rank: no such config field" in problems_for(tmp_path, base)


def test_sweep_over_budget_prints_trial_count(tmp_path: Path, base: dict):
    base["sweep"] = {"num_samples": 5, "max_trials": 20,
                     "parameters": {"lora.r": {"grid": [1, 2, 4, 8]}, "train.lr": {"grid": [1e-3, 3e-3]}}}
    assert "sweep: 40 trials exceed sweep.max_trials=20" in problems_for(tmp_path, base)


def test_overrides_parse_yaml_values_and_env_precedence(tmp_path: Path, base: dict):
    assert parse_overrides(["lora.r=8", "lora.target_modules=[query, key]", "name=x"]) == [
        ("lora.r", 8), ("lora.target_modules", ["query", "key"]), ("name", "x")]
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        parse_overrides(["lora.r"])
    path = write_yaml(tmp_path / "c.yaml", base)
    env = {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5999", "RAY_ADDRESS": "127.0.0.1:6379"}
    config = load_config(path, [], env=env)
    assert config.tracking.tracking_uri == "http://127.0.0.1:5999"
    assert config.ray.address == "127.0.0.1:6379"
    config = load_config(path, ["tracking.tracking_uri=http://127.0.0.1:6000"], env=env)
    assert config.tracking.tracking_uri == "http://127.0.0.1:6000"  # command line beats env


def test_trial_config_applies_sampled_values(base: dict, tmp_path: Path):
    config = load_config(write_yaml(tmp_path / "c.yaml", base), ["sweep.parameters.lora.r={grid: [2, 8]}"], env={})
    trial = config.trial_config({"lora.r": 8, "lora.target_modules": ["query"]})
    assert trial.lora.r == 8 and trial.lora.target_modules == ["query"]
    assert trial.sweep.parameters == {}
    assert isinstance(ExperimentConfig.model_validate(trial.model_dump(mode="json")), ExperimentConfig)
    assert not math.isnan(trial.train.lr)


def test_rank_log_range_alpha_rules_and_presets(tmp_path: Path, base: dict):
    """Search spaces in the LoRA paper's terms: r over powers of two, alpha fixed or k·r, target presets."""
    from pipeline import sweep

    base["sweep"] = {"searcher": "grid", "scheduler": "median", "max_trials": 64, "parameters": {
        "lora.r": {"pow2": [1, 1024]},
        "lora.alpha": {"grid": [16, {"times_r": 2}]},
        "lora.target_modules": {"grid": ["attention_qv", "attention_all"]},
    }}
    config = load_config(write_yaml(tmp_path / "c.yaml", base), env={})
    assert config.sweep.parameters["lora.r"].values() == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
    assert config.sweep.trial_count() == 11 * 2 * 2
    trials = sweep.candidate_configs(config)
    assert {(c.lora.r, c.lora.effective_alpha) for c in trials if c.lora.r == 64} == {(64, 16.0), (64, 128.0)}
    # random/optuna sample the same powers of two
    base["sweep"] = {"searcher": "random", "num_samples": 3, "parameters": {"lora.r": {"pow2": [4, 64]}}}
    config = load_config(write_yaml(tmp_path / "c.yaml", base), env={})
    assert sweep.tune_domain(config.sweep.parameters["lora.r"], "random").categories == [4, 8, 16, 32, 64]
    assert "unknown preset 'attention_q'" in problems_for(tmp_path, base, ["lora.target_modules=attention_q"])
    assert "lora.alpha" in problems_for(tmp_path, base, ["lora.alpha={times_r: 0}"])


def test_presets_resolve_per_architecture():
    from pipeline.adapters import ALL_LINEAR, resolve_targets

    assert resolve_targets("attention_qv", "bert") == ["query", "value"]
    assert resolve_targets("attention_mlp", "llama")[-3:] == ["gate_proj", "up_proj", "down_proj"]
    assert resolve_targets("attention_qv", "gpt2") == ["c_attn"]
    assert resolve_targets("all_linear", "anything") == ALL_LINEAR
    assert resolve_targets(["q", "v"], "bert") == ["q", "v"]
    with pytest.raises(ValueError, match="not defined for model type 'mamba'"):
        resolve_targets("attention_qv", "mamba")


def test_schedulers_take_metric_free_settings_from_the_config(tmp_path: Path, base: dict):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule

    from pipeline.sweep import make_scheduler

    base["sweep"] = {"scheduler": "median", "median_min_samples": 3, "asha": {"grace_period": 4}}
    median = make_scheduler(load_config(write_yaml(tmp_path / "c.yaml", base), env={}).sweep, max_t=10)
    assert isinstance(median, MedianStoppingRule)
    assert (median._grace_period, median._min_samples_required, median._time_attr) == (4, 3, "training_iteration")
    base["sweep"] = {"scheduler": "asha", "asha": {"grace_period": 40}}
    asha = make_scheduler(load_config(write_yaml(tmp_path / "c.yaml", base), env={}).sweep, max_t=10)
    assert isinstance(asha, ASHAScheduler) and asha._max_t == 10  # grace capped at max_t, else Ray refuses it
    base["sweep"] = {"scheduler": "fifo"}
    assert isinstance(make_scheduler(load_config(write_yaml(tmp_path / "c.yaml", base), env={}).sweep, 10), FIFOScheduler)


def test_pbt_needs_an_lr_domain_a_population_and_no_optuna(tmp_path: Path, base: dict):
    base["sweep"] = {"scheduler": "pbt", "parameters": {"lora.r": {"grid": [2, 4]}}}
    assert "pbt explores train.lr; add its domain to sweep.parameters" in problems_for(tmp_path, base)
    base["sweep"] = {"scheduler": "pbt", "parameters": {"train.lr": {"grid": [1e-3]}}}
    assert "pbt needs a population of at least 2 trials, the sweep has 1" in problems_for(tmp_path, base)
    base["sweep"] = {"scheduler": "pbt", "searcher": "optuna", "num_samples": 4,
                     "parameters": {"train.lr": {"loguniform": [1e-4, 1e-2]}}}
    assert "sweep.searcher: optuna cannot run under scheduler pbt" in problems_for(tmp_path, base)
    base["sweep"] = {"scheduler": "pbt", "searcher": "random", "num_samples": 4,
                     "parameters": {"train.lr": {"randint": [1, 3]}}}
    assert "sweep.parameters.train.lr: pbt needs a grid, choice, uniform or loguniform domain" in problems_for(tmp_path, base)


def test_pbt_scheduler_mutates_lr_only(tmp_path: Path, base: dict):
    from ray.tune.schedulers import PopulationBasedTraining

    from pipeline.sweep import make_scheduler

    base["sweep"] = {"scheduler": "pbt", "searcher": "random", "num_samples": 4,
                     "pbt": {"perturbation_interval": 3, "quantile_fraction": 0.5, "resample_probability": 0.0},
                     "parameters": {"train.lr": {"loguniform": [1e-4, 1e-2]}, "lora.r": {"choice": [2, 8]}}}
    pbt = make_scheduler(load_config(write_yaml(tmp_path / "c.yaml", base), env={}).sweep, 10, tmp_path / "train")
    assert isinstance(pbt, PopulationBasedTraining)
    assert list(pbt._hyperparam_mutations) == ["train__lr"]
    assert (pbt._perturbation_interval, pbt._quantile_fraction, pbt._resample_probability) == (3, 0.5, 0.0)
    base["sweep"]["parameters"]["train.lr"] = {"grid": [1e-4, 1e-3, 1e-2]}
    base["sweep"]["searcher"] = "grid"
    base["sweep"]["parameters"]["lora.r"] = {"grid": [2, 8]}
    pbt = make_scheduler(load_config(write_yaml(tmp_path / "c.yaml", base), env={}).sweep, 10, tmp_path / "train")
    assert pbt._hyperparam_mutations == {"train__lr": [1e-4, 1e-3, 1e-2]}  # a grid: explore steps along it


def test_shuffled_grid_runs_every_point_once_in_a_seeded_order_under_the_concurrency_limit(tmp_path: Path, base: dict):
    from ray.tune.experiment import Experiment

    from pipeline.sweep import shuffled_grid

    base["sweep"] = {"grid_order": "shuffled", "num_samples": 2, "parameters": {
        "lora.target_modules": {"grid": ["attention_qv", "attention_all"]}, "train.lr": {"grid": [1e-4, 1e-3, 1e-2]}}}
    sweep = load_config(write_yaml(tmp_path / "c.yaml", base), env={}).sweep

    def order(seed: int) -> list[tuple]:
        param_space, search_alg, num_samples = shuffled_grid(sweep, seed=seed, concurrency=3)
        assert num_samples == 12
        search_alg.add_configurations([Experiment("x", lambda c: None, config=param_space, num_samples=num_samples)])
        live = [search_alg.next_trial() for _ in range(3)]
        # Tune applies max_concurrent_trials only to its own default generator: this one limits itself
        assert search_alg.next_trial() is None
        trials = []
        while live:
            trial = live.pop(0)
            trials.append((trial.config["lora__target_modules"], trial.config["train__lr"]))
            search_alg.on_trial_complete(trial.trial_id)
            if (following := search_alg.next_trial()) is not None:
                live.append(following)
        return trials

    first = order(0)
    listed = [(t, lr) for lr in (1e-4, 1e-3, 1e-2) for t in ("attention_qv", "attention_all")] * 2
    assert sorted(first) == sorted(listed) and first != listed
    assert order(0) == first and order(1) != first


def test_the_config_reference_is_generated_from_the_models_and_up_to_date():
    """docs/config.md is `python -m pipeline.config_reference`'s output: a field added or described anew without
    regenerating it fails here. Every leaf key has a meaning."""
    from pipeline import config_reference

    text = config_reference.render()
    assert config_reference.DOC.read_text() == text, "docs/config.md is stale: run python -m pipeline.config_reference"
    table_rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert len(table_rows) > 100
    assert not [row for row in table_rows if row.rstrip().endswith("|  |")], "a key without a description"
    for key in ("`lora.alpha`", "`sweep.pack_size`", "`judge.api_key_env`", "`strategy.load_in_4bit.quant_type`"):
        assert any(row.startswith(f"| {key}") for row in table_rows), key


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_every_shipped_config_validates(name: str):
    config = load_config(REPO / "configs" / name, env={"LORAFORGE_DATA_ROOT": str(REPO / "data")})
    if name == "chat_sweep.yaml":  # target preset x rsLoRA x lr
        assert config.sweep.trial_count() == 12 and config.data.kind == "chat"
