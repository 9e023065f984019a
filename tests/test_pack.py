"""Packed trials (pipeline.pack, pipeline.pack_train, pipeline.sweep.planner).

- A packed config trains exactly like the same config alone: after N steps on the same seed and
  batches (fp32, CPU, dropout 0) every adapter tensor matches a solo run to 1e-5, in a pack that
  mixes ranks, target sets, lr and the rsLoRA rule, each with its own head and pooler.
- A non-finite loss stops its adapter, not the pack; the others still match their solo runs.
- A saved packed adapter is a plain PEFT folder.
- Successive halving's rungs and survivors; the grouping of a sweep into packs; the memory
  planner against measured peak RSS; bad input (exit 2).
- One whole packed sweep through `loraforge run`, interrupted and `--resume`d: one Tune trial,
  one MLflow run per config with its status and history, equal budgets per rung, and the best
  config registered.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline import adapters, data, pack, sweep, tracking
from pipeline.sweep import planner
from pipeline.config import ConfigError, ExperimentConfig, load_config
from pipeline.strategies import PlainLora, Worker
from tests.support.configs import REPO, head_jsonl, minilm_config, write_yaml
from tests.support.ray_cluster import stop_every_ray
from tests.support.driver import loraforge_run

SEED, STEPS, BATCH = 3, 6, 8
POINTS = [
    {"lora.r": 2},
    {"lora.r": 8, "lora.target_modules": ["query", "key", "value", "attention.output.dense"], "train.lr": 2e-3},
    {"lora.r": 4, "lora.target_modules": ["key", "value"], "lora.use_rslora": True, "lora.alpha": 4},
]


@pytest.fixture(scope="module")
def setting(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("pack")
    sst2 = {"train": head_jsonl("sst2/train.jsonl", tmp / "train.jsonl", BATCH * STEPS),
            "eval": head_jsonl("sst2/dev.jsonl", tmp / "dev.jsonl", 16)}
    base = ExperimentConfig.model_validate(minilm_config(
        tmp, sst2, lora={"dropout": 0.0}, train={"batch_size": BATCH, "seed": SEED, "lr": 1e-3, "warmup_ratio": 0.2,
                                                 "max_grad_norm": 0.5}))
    tokenizer = adapters.load_tokenizer(base.model, base.data)
    examples = data.with_targets(data.tokenize_rows(base.data, data.load_split(base.data, "train", SEED), tokenizer))
    order = data.make_batches([len(e.input_ids) for e in examples], BATCH, shuffle=True, seed=SEED,
                              bucketing=base.train.length_bucketing, rank=0, world_size=1)
    batches = [data.collate([examples[i] for i in idx], tokenizer.pad_token_id) for idx in order[:STEPS]]
    return base, [base.trial_config(p) for p in POINTS], batches


def _no_dropout(model: torch.nn.Module) -> None:
    # "dropout 0": the base's own dropout too (MiniLM's hidden and attention dropout are 0.1)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def _schedule(optimizer, config: ExperimentConfig):
    from transformers import get_scheduler

    return get_scheduler(config.train.lr_scheduler, optimizer, num_training_steps=STEPS,
                         num_warmup_steps=math.ceil(config.train.warmup_ratio * STEPS))


def solo_run(config: ExperimentConfig, batches) -> dict[str, torch.Tensor]:
    """The config alone, as pipeline.train steps it: the strategy's model and optimizer, the model's own loss."""
    from peft import get_peft_model_state_dict

    torch.manual_seed(SEED)
    strategy = PlainLora(config, Worker())
    peft_model = strategy.load_model()
    _no_dropout(peft_model)
    model, optimizer = strategy.wrap(peft_model)
    scheduler = _schedule(optimizer, config)
    model.train()
    for batch in batches:
        strategy.backward(model(**batch).loss)
        strategy.step()
        scheduler.step()
    return get_peft_model_state_dict(peft_model)


def packed_run(base: ExperimentConfig, configs: list[ExperimentConfig], batches, poison: tuple[str, int] | None = None):
    torch.manual_seed(SEED)
    model = pack.PackedLora(adapters.load_base_model(base.model, base.data), configs)
    _no_dropout(model.model)
    members = [pack.Member(name, config, {}) for name, config in zip(model.names, configs)]
    for member in members:
        member.optimizer = pack.member_optimizer(model, member)
        member.scheduler = _schedule(member.optimizer, member.config)
    model.model.train()
    for step, batch in enumerate(batches):
        if poison is not None and step == poison[1]:
            with torch.no_grad():
                next(p for n, p in model.named[poison[0]] if "lora_B" in n).fill_(float("nan"))
        pack.backward(model, members, batch, 1, True, step)
        for member in members:
            if member.live:
                pack.clip_and_step(model, member)
    return model, members


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:4]
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_packed_configs_train_exactly_like_solo_runs(setting, tmp_path: Path):
    base, configs, batches = setting
    model, members = packed_run(base, configs, batches)
    assert all(m.live for m in members)
    for member, config in zip(members, configs):
        solo = solo_run(config, batches)
        packed = model.state_dict_of(member.name)
        # the adapter trained: B moved off its zero init, and the head and pooler copies are its own
        assert max(float(t.abs().max()) for k, t in packed.items() if "lora_B" in k) > 1e-4
        assert any("classifier" in k for k in packed) and any("pooler" in k for k in packed)
        assert max_difference(packed, solo) < 1e-5, member.name

    # a packed adapter is a plain PEFT folder: loaded the usual way it predicts what the pack's routing does
    from peft import PeftModel

    model.save("c1", tmp_path / "c1", {"step": STEPS})
    plain = PeftModel.from_pretrained(adapters.load_base_model(base.model, base.data), str(tmp_path / "c1")).eval()
    model.model.eval()
    batch = batches[0]
    with torch.no_grad(), model.only("c1"):
        routed = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    with torch.no_grad():
        loaded = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert float((routed - loaded).abs().max()) < 1e-5


def test_a_non_finite_loss_stops_its_adapter_not_the_pack(setting):
    base, configs, batches = setting
    model, members = packed_run(base, configs, batches, poison=("c1", 2))
    assert [m.status for m in members] == ["LIVE", "ERROR", "LIVE"]
    assert members[1].stopped_step == 2 and "non-finite loss" in members[1].error
    # the others never saw it: still exactly their solo runs
    for index in (0, 2):
        assert max_difference(model.state_dict_of(members[index].name), solo_run(configs[index], batches)) < 1e-5


def test_rungs_are_equal_step_budgets_and_halving_keeps_the_top():
    assert pack.rung_steps(125, 1000, 1, 2) == [125, 250, 500]
    assert pack.rung_steps(125, 1000, 2, 2) == [250, 500]
    assert pack.rung_steps(5, 20, 1, 3) == [5, 15]
    assert pack.rung_steps(10, 10, 1, 2) == []
    assert pack.survivors({"c0": 0.5, "c1": 0.9, "c2": 0.7, "c3": 0.1}, 2, "max") == ["c1", "c2"]
    assert pack.survivors({"c0": 0.5, "c1": 0.9, "c2": 0.7}, 2, "min") == ["c0", "c2"]
    assert pack.survivors({"c0": float("nan"), "c1": 0.2, "c2": 0.2}, 3, "max") == ["c1"]  # ties: the earlier
    assert pack.survivors({"c0": 0.3}, 4, "max") == ["c0"]


def load(tmp_path: Path, raw: dict, overrides: list[str] | None = None) -> ExperimentConfig:
    return load_config(write_yaml(tmp_path / "c.yaml", raw), overrides or [], env={})


GRID = {"lora.r": {"grid": [2, 8]}, "lora.target_modules": {"grid": [["query", "value"], ["query", "key", "value"]]}}
ONE_NODE = sweep.Resources(2, 0, 2, 0, nodes=1, max_node_memory=16 * planner.GiB)


def test_packs_group_compatible_configs_and_balance_the_devices(tmp_path: Path, sst2_small):
    raw = minilm_config(tmp_path, sst2_small, sweep={"pack_size": "auto", "parameters": GRID})
    plan = planner.plan(load(tmp_path, raw), ONE_NODE)
    # one CPU node: one pack of four, its worker takes both cores
    assert [len(p) for p in plan.packs] == [4] and plan.concurrency == 1 and plan.cpus_per_pack == 2
    # a second seed is a second pack (the seed draws the data order); eight GPUs get packs of one GPU each
    raw["sweep"]["parameters"] = {**GRID, "train.seed": {"grid": [0, 1]}}
    plan = planner.plan(load(tmp_path, raw), ONE_NODE)
    assert sorted(len(p) for p in plan.packs) == [4, 4]
    assert all(len({point["train.seed"] for point in p}) == 1 for p in plan.packs)
    raw["train"]["gpus_per_worker"] = 1
    raw["sweep"]["pack_memory_gib"] = 20
    plan = planner.plan(load(tmp_path, raw), sweep.Resources(16, 4, 16, 4, nodes=1, max_node_memory=64 * planner.GiB))
    assert [len(p) for p in plan.packs] == [2, 2, 2, 2] and plan.concurrency == 4 and plan.cpus_per_pack == 1
    # nothing packs where packing cannot run, or when asked not to
    for overrides in (["sweep.pack_size=1"], ["sweep.scheduler=median"], ["train.num_workers=2"]):
        raw = minilm_config(tmp_path, sst2_small, sweep={"pack_size": "auto", "parameters": GRID})
        assert planner.plan(load(tmp_path, raw, overrides), sweep.Resources(4, 0, 4, 0, 1, 16 * planner.GiB)) is None


def test_bad_packing_input_is_refused_with_the_fix(tmp_path: Path, sst2_small):
    raw = minilm_config(tmp_path, sst2_small, sweep={"pack_size": 4, "parameters": GRID})
    for overrides, expected in (
        (["sweep.pack_size=0"], "sweep.pack_size: 0 is below 1"),
        (["sweep.scheduler=median"], "scheduler median, which cannot judge configs inside a pack"),
        (["strategy.kind=zero3_offload"], "under strategy zero3_offload"),
        (["train.num_workers=2"], "a pack trains on one worker"),
    ):
        with pytest.raises(ConfigError, match=expected):
            load(tmp_path, raw, overrides)
    mixed = minilm_config(tmp_path, sst2_small, sweep={"pack_size": 2, "parameters": {
        "lora.r": {"grid": [2, 8]}, "data.max_seq_len": {"grid": [32, 64]}}})
    with pytest.raises(ConfigError, match="varies data.max_seq_len; a pack shares one base model, strategy and data"):
        load(tmp_path, mixed)
    # more than the planner fits, with its numbers
    raw["sweep"]["pack_memory_gib"] = 0.5
    with pytest.raises(ConfigError, match=r"sweep.pack_size: 4 configs do not fit in one pack, at most \d+ do: base "):
        planner.plan(load(tmp_path, raw), ONE_NODE)
    raw["sweep"]["pack_memory_gib"] = 0.01
    with pytest.raises(ConfigError, match="not even one config fits"):
        planner.plan(load(tmp_path, raw), ONE_NODE)


MEASURE = """
import json, resource, sys, psutil, torch
from pipeline import adapters, pack
from pipeline.sweep import planner
from pipeline.config import ExperimentConfig
configs = [ExperimentConfig.model_validate(c) for c in json.loads(sys.argv[1])]
first = configs[0]
torch.set_num_threads(1)
import transformers, peft  # imports are not the pack's memory
before = psutil.Process().memory_info().rss
model = pack.PackedLora(adapters.load_base_model(first.model, first.data), configs)
members = [pack.Member(n, c, {}) for n, c in zip(model.names, configs)]
for m in members:
    m.optimizer = pack.member_optimizer(model, m)
    m.scheduler = torch.optim.lr_scheduler.LambdaLR(m.optimizer, lambda s: 1.0)
b, s = first.train.batch_size, first.data.max_seq_len
batch = {"input_ids": torch.randint(1000, 2000, (b, s)), "attention_mask": torch.ones(b, s, dtype=torch.long),
         "labels": torch.randint(0, 2, (b,))}
for step in range(3):
    pack.backward(model, members, batch, 1, True, step)
    for m in members:
        pack.clip_and_step(model, m)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"measured": peak - before, "estimated": planner.estimate(configs).total()}))
"""


@pytest.mark.slow  # trains a 16-adapter pack in a subprocess to measure its peak RSS (about a minute)
def test_memory_planner_estimate_against_measured_peak_rss(tmp_path: Path, sst2_small):
    raw = minilm_config(tmp_path, sst2_small, train={"batch_size": 32}, data={"max_seq_len": 128},
                        sweep={"pack_size": "auto", "parameters": GRID})
    cfg = load(tmp_path, raw)
    configs = [cfg.trial_config(p) for p in sweep.grid_points(cfg.sweep)]
    out = subprocess.run([sys.executable, "-c", MEASURE, json.dumps([c.model_dump(mode="json") for c in configs])],
                         cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr[-3000:]
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    ratio = figures["measured"] / figures["estimated"]
    print(f"planner: estimated {figures['estimated'] / 2**20:.0f} MiB, measured peak RSS growth "
          f"{figures['measured'] / 2**20:.0f} MiB (ratio {ratio:.2f})")
    # an estimate, not an accounting, but one a pack is sized by: it must not fall short of the measured
    # peak (a pack that does not fit fails mid-sweep) and should not overstate it by more than 1/0.6
    # (packs too small). Measured 0.80 at 113a781 (3550 MiB of 4419 MiB estimated).
    assert 0.6 <= ratio <= 1.05, figures
    one, four = (planner.estimate(configs[:n]).total() for n in (1, 4))
    assert four > one + 2 * planner.estimate(configs[:1]).activation_bytes[0]


# ------------------------------------------------------------------------------- a whole packed sweep


@pytest.mark.slow
def test_packed_sweep_halves_at_equal_budgets_resumes_and_registers_the_best(tmp_path: Path, sst2_small):
    raw = minilm_config(tmp_path, sst2_small, train={"epochs": 2}, sweep={
        "pack_size": "auto", "scheduler": "asha", "asha": {"grace_period": 1, "reduction_factor": 2}, "parameters": GRID})
    raw["name"] = "packed"
    path = write_yaml(tmp_path / "c.yaml", raw)
    uri = raw["tracking"]["tracking_uri"]
    storage = Path(raw["ray"]["storage_path"])

    # the driver is killed once the pack has committed its second checkpoint (after the first rung)
    driver = loraforge_run(str(path), cwd=tmp_path, start_new_session=True)
    deadline = time.time() + 400
    manifests = []
    while time.time() < deadline and driver.poll() is None and len(manifests) < 2:
        manifests = list(storage.glob("packed/train/train-*/checkpoint_*/MANIFEST.rank0.json"))
        time.sleep(0.1)
    assert len(manifests) >= 2 and driver.poll() is None, driver.communicate()[0][-3000:] if driver.poll() else ""
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    stop_every_ray()  # the killed driver's instance (and, first, any this process still has)

    resumed = loraforge_run(str(path), "--resume", cwd=tmp_path)
    output, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, output[-3000:]
    assert "resuming sweep" in output and "4 configs in 1 packs" in output

    # one Tune trial, one Train run for the pack
    assert len(list(storage.glob("packed/train/train-*"))) == 1
    client = tracking.client(uri)
    experiment = client.get_experiment_by_name("tests")
    runs = client.search_runs([experiment.experiment_id], "tags.`loraforge.trial_id` != ''")
    assert len(runs) == 4 and len({r.data.tags["loraforge.pack"] for r in runs}) == 1
    status = {r.data.tags["loraforge.pack_member"]: r for r in runs}
    evals = {name: [m.step for m in client.get_metric_history(r.info.run_id, "eval_accuracy")] for name, r in status.items()}
    by_steps = sorted(evals.items(), key=lambda item: len(item[1]))
    # 4 configs to step 5, the best 2 to step 10, the best one to the end (step 20); every rung's budget is equal
    assert [sorted(set(steps)) for _, steps in by_steps] == [[5], [5], [5, 10], [5, 10, 15, 20]], evals
    tags = {name: (r.data.tags["loraforge.trial_status"], r.data.tags.get("loraforge.stopped_at_rung"), r.info.status)
            for name, r in status.items()}
    (first_out, _), (second_out, _), (third_out, _), (winner, _) = by_steps
    assert tags[first_out] == tags[second_out] == ("STOPPED", "1", "FINISHED")
    assert tags[third_out] == ("STOPPED", "2", "FINISHED") and tags[winner] == ("DONE", None, "FINISHED")
    # the survivors of rung 1 were the top 2 there
    at5 = {name: next(m.value for m in client.get_metric_history(r.info.run_id, "eval_accuracy") if m.step == 5)
           for name, r in status.items()}
    assert min(at5[third_out], at5[winner]) >= max(at5[first_out], at5[second_out])
    # the pack continued from its checkpoint, not from step 0
    assert int(status[winner].data.tags["loraforge.resumed_from_step"]) >= 5
    # every config has its adapter attached, a plain PEFT folder; the best config is the registered one
    for r in runs:
        names = {f.path for f in client.list_artifacts(r.info.run_id, tracking.ADAPTER_ARTIFACT)}
        assert f"{tracking.ADAPTER_ARTIFACT}/adapter_model.safetensors" in names, names
    registered = client.get_run(client.get_model_version_by_alias("test-sst2-lora", "candidate").run_id)
    assert registered.info.run_id in {r.info.run_id for r in runs}
    assert registered.data.metrics["best_eval_accuracy"] == max(r.data.metrics["best_eval_accuracy"] for r in runs)
    assert client.get_run(runs[0].data.tags["mlflow.parentRunId"]).info.status == "FINISHED"
