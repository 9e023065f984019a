"""The evaluation stage: score an adapter, the base without it and the champion with benchmark suites.

`run_stage` is what `loraforge eval` and the end of `loraforge run` call:

1. check the suites against the config (exit 2 before any generation);
2. pin every model to a fixed reference (`models:/name@alias` -> `models:/name/N`);
3. check that each adapter applies (`applied.py`: LoRA layers attached, B not all zero, logits unlike the
   base's, merged equal to unmerged); a model whose adapter changes nothing is failed, never scored, and
   without the candidate there is nothing to score;
4. per suite, Ray tasks with one trial worker's resources load the base once per shard of the items,
   attach every model's adapter beside the others (`eval.one_load`; or one task per model) and run
   the suite over the shard for each model in turn;
5. the driver scores the gathered outputs; a suite that fails is reported and the others go on;
6. the results go to an MLflow evaluation run (metrics, per-item tables, the report), to the
   model version's tags, to `--json`, and to a terminal table.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from pipeline import adapters, atomic, cluster, data, redact, strategies, tracking
from pipeline.config import JUDGE_SUITES, ConfigError, ExperimentConfig
from pipeline.eval import applied, catalog, report
from pipeline.eval.catalog import suite_names
from pipeline.eval.judge import stage as judge_stage

log = logging.getLogger("loraforge")

SCHEMA_FILE = Path(__file__).parent / "results.schema.json"


@dataclass
class EvalModel:
    role: str  # candidate | base | champion | trial:<name>
    ref: str | None  # adapter reference (None: the base model without an adapter)
    version: str | None = None
    params: dict[str, Any] = field(default_factory=dict)  # a trial's sampled config
    same_as: str | None = None  # a trial whose adapter is the candidate's: its scores, not scored twice


@dataclass
class StageResult:
    results: dict[str, Any]
    failed: dict[str, str] = field(default_factory=dict)
    run_id: str | None = None


def check(config: ExperimentConfig, names: list[str]) -> None:
    """Every problem the suites can see before any model runs, at once."""
    problems: list[str] = []
    try:
        data.load_split(config.data, "eval", config.train.seed)
    except ConfigError as err:
        problems += err.problems
    for name in names:
        if name not in JUDGE_SUITES:
            problems += catalog.get(name).check(config)
    if problems:
        raise ConfigError(problems)


def pin(ref: str, tracking_uri: str) -> tuple[str, str | None]:
    """(a reference that cannot move, its model version or None): aliases resolve to their version now."""
    if ref.startswith("models:/"):
        name, sep, alias = ref.removeprefix("models:/").partition("@")
        mlflow_client = tracking.client(tracking_uri)
        if sep:
            version = mlflow_client.get_model_version_by_alias(name, alias).version
            return f"models:/{name}/{version}", str(version)
        name, _, version = name.partition("/")
        mlflow_client.get_model_version(name, version)  # fails now, not in a task, if it is not there
        return ref, version
    if Path(ref).is_dir():
        weights = tracking.adapter_dir(Path(ref)) / "adapter_model.safetensors"
        if not weights.is_file() or weights.stat().st_size == 0:
            raise ConfigError([f"--model: {ref} is a folder without adapter weights ({weights} is "
                               f"{'empty' if weights.is_file() else 'missing'}); give a PEFT adapter folder "
                               "(adapter_config.json + adapter_model.safetensors), a models:/ or a runs:/ URI"])
        return ref, None
    if ref.startswith("runs:/"):
        return ref, None
    raise ConfigError([f"--model: {ref!r} is neither an adapter folder nor a models:/ or runs:/ URI"])


def models_to_score(config: ExperimentConfig, model_ref: str | None, trials: list[EvalModel] | None = None) -> list[EvalModel]:
    tracking_uri = config.tracking.tracking_uri
    name = config.tracking.registered_model_name
    ref = model_ref or f"models:/{name}@{config.tracking.alias}"
    try:
        pinned, version = pin(ref, tracking_uri)
    except ConfigError:
        raise
    except Exception as err:  # the registry does not know it: say which reference
        raise ConfigError([f"--model: cannot resolve {ref!r} ({err.__class__.__name__}: {err}); register an adapter "
                           "first (loraforge run) or pass --model models:/name/N, runs:/ID/adapter or a folder"]) from None
    models = [EvalModel("candidate", pinned, version), EvalModel("base", None)]
    try:
        champion = tracking.client(tracking_uri).get_model_version_by_alias(name, config.registry.promotion.to_alias)
    except Exception:  # no champion yet
        champion = None
    if champion is not None and str(champion.version) != version:
        models.append(EvalModel("champion", f"models:/{name}/{champion.version}", str(champion.version)))
    return models + list(trials or [])


def load_model(config: ExperimentConfig, ref: str | None, workdir: Path) -> tuple[Any, Any]:
    """(model, tokenizer): the base as the trials trained against it, with the adapter `ref` on top if given."""
    model, tokenizer, _ = _load(config, ref, workdir)
    return model, tokenizer


def _device(config: ExperimentConfig) -> Any:
    """A task asking for a GPU sees it (Ray sets CUDA_VISIBLE_DEVICES); without one, the CPU."""
    import torch

    return torch.device("cuda") if config.train.gpus_per_worker and torch.cuda.is_available() else torch.device("cpu")


def _load(config: ExperimentConfig, ref: str | None, workdir: Path) -> tuple[Any, Any, Path | None]:
    """`load_model`, and the adapter folder it fetched into `workdir` (None without `ref`)."""
    tokenizer = adapters.load_tokenizer(config.model, config.data)
    adapter_dir = None if ref is None else tracking.fetch_adapter(ref, config.tracking.tracking_uri, workdir / "adapter")
    return strategies.load_trained(config, adapter_dir, _device(config)), tokenizer, adapter_dir


def check_adapter(config_dict: dict[str, Any], ref: str) -> dict[str, Any]:
    """One task: load the adapter model `ref` and check that its adapter applies (`applied.check`)."""
    import torch

    config = ExperimentConfig.model_validate(config_dict)
    torch.set_num_threads(max(1, int(config.train.cpus_per_worker)))
    with tempfile.TemporaryDirectory(prefix="loraforge-check-") as tmp:
        try:
            model, tokenizer, adapter_dir = _load(config, ref, Path(tmp))
            return applied.check(config, model, tokenizer, adapter_dir).as_dict()
        except Exception as err:  # an adapter PEFT cannot attach (target names that match nothing, no weights)
            return applied.AdapterCheck(False, f"{ref}: cannot load the adapter: {err.__class__.__name__}: "
                                               f"{str(err)[:2000]}").as_dict()


def _check_adapters(config: ExperimentConfig, models: list[EvalModel]) -> dict[str, dict[str, Any]]:
    """`check_adapter` for every model with an adapter, as Ray tasks side by side: role -> its check."""
    import ray

    train = config.train
    task = ray.remote(num_cpus=train.cpus_per_worker, num_gpus=train.gpus_per_worker, max_retries=0)(check_adapter)
    config_dict = config.model_dump(mode="json")
    pending = {m.role: task.remote(config_dict, m.ref) for m in models if m.ref is not None}
    checks = {role: ray.get(ref) for role, ref in pending.items()}
    for role, found in checks.items():
        if found["ok"]:
            log.info("adapter check %s: %d LoRA layers, logits %.2e from the base's, merged %.2e from unmerged",
                     role, found["lora_layers"], found["effect"], found["merge_diff"])
        else:
            log.error("adapter check %s FAILED: %s", role, found["reason"])
    return checks


def run_shard(config_dict: dict[str, Any], suite_name: str, ref: str | None, items: list[dict[str, Any]],
              label: str) -> dict[str, Any]:
    """One task: load the model and run one suite over one shard of its items."""
    import torch
    from tqdm import tqdm

    config = ExperimentConfig.model_validate(config_dict)
    torch.set_num_threads(max(1, int(config.train.cpus_per_worker)))
    with tempfile.TemporaryDirectory(prefix="loraforge-eval-") as tmp:
        began = time.perf_counter()
        model, tokenizer = load_model(config, ref, Path(tmp))
        load_s = time.perf_counter() - began
        with tqdm(total=len(items), desc=f"{suite_name} {label}", mininterval=10, leave=False) as progress:
            out = catalog.get(suite_name).outputs(config, model, tokenizer, items, progress)
    out["load_seconds"] = load_s
    out["seconds"] = time.perf_counter() - began
    return out


def load_models(config: ExperimentConfig, refs: list[str | None], workdir: Path) -> tuple[Any, Any, list[str | None]]:
    """(model, tokenizer, adapter names): the base loaded once with every adapter of `refs` attached under its own
    name (PEFT's multi-adapter model; None in `refs` is the base itself, its name None)."""
    tokenizer = adapters.load_tokenizer(config.model, config.data)
    model = strategies.load_trained(config, None, _device(config))
    names: list[str | None] = []
    for i, ref in enumerate(refs):
        if ref is None:
            names.append(None)
            continue
        folder = tracking.fetch_adapter(ref, config.tracking.tracking_uri, workdir / f"adapter{i}")
        name = f"m{i}"
        if not any(names):  # the first adapter wraps the base; the others join it
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(folder), adapter_name=name)
        else:
            model.load_adapter(str(folder), adapter_name=name)
        names.append(name)
    return model.eval(), tokenizer, names


@contextlib.contextmanager
def active(model: Any, name: str | None) -> Iterator[None]:
    """`name`'s adapter alone is active (None: no adapter, the base)."""
    if name is None:
        with (model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()):
            yield
        return
    model.set_adapter(name)
    yield


def run_shard_one_load(config_dict: dict[str, Any], suite_name: str, refs: list[str | None], items: list[dict[str, Any]],
                       labels: list[str]) -> list[dict[str, Any]]:
    """One task: the base loaded once with every adapter of `refs`, the suite run over one shard of its items for
    each in turn (one output per ref, as `run_shard` gives for one model; the load time split evenly)."""
    import torch
    from tqdm import tqdm

    config = ExperimentConfig.model_validate(config_dict)
    torch.set_num_threads(max(1, int(config.train.cpus_per_worker)))
    suite = catalog.get(suite_name)
    outs = []
    with tempfile.TemporaryDirectory(prefix="loraforge-eval-") as tmp:
        began = time.perf_counter()
        model, tokenizer, names = load_models(config, refs, Path(tmp))
        load_s = (time.perf_counter() - began) / len(refs)
        with tqdm(total=len(items) * len(refs), desc=f"{suite_name} {len(refs)} models, one load", mininterval=10,
                  leave=False) as progress:
            for name, label in zip(names, labels):
                started = time.perf_counter()
                with active(model, name):
                    out = suite.outputs(config, model, tokenizer, items, progress)
                out["load_seconds"] = load_s
                out["seconds"] = time.perf_counter() - started + load_s
                outs.append(out)
    return outs


def _shards(items: list[dict[str, Any]], count: int) -> list[list[dict[str, Any]]]:
    count = max(1, min(count, len(items)))
    return [items[i::count] for i in range(count)]


def _gather(config: ExperimentConfig, suite_name: str, models: list[EvalModel], items: list[dict[str, Any]],
            label: str | None = None) -> dict[str, dict[str, Any]]:
    """Run `suite_name` for every model as Ray tasks (or in process without Ray); outputs per model role."""
    import ray
    from tqdm import tqdm

    suite = catalog.get(suite_name)
    shards = _shards(items, config.eval.shards if suite.shardable else 1)
    config_dict = config.model_dump(mode="json")
    outputs: dict[str, dict[str, Any]] = {m.role: {"items": [], "gen_tokens": 0, "gen_seconds": 0.0, "seconds": 0.0}
                                          for m in models}
    train = config.train
    options = {"num_cpus": train.cpus_per_worker, "num_gpus": train.gpus_per_worker, "max_retries": 0}
    if config.eval.one_load and len(models) > 1:
        # every model on one base load per shard: the adapters attached side by side, the suite run for each
        task = ray.remote(**options)(run_shard_one_load)
        roles = [m.role for m in models]
        pending = {task.remote(config_dict, suite_name, [m.ref for m in models], shard, roles): (roles, len(shard))
                   for shard in shards}
    else:
        task = ray.remote(**options)(run_shard)
        pending = {task.remote(config_dict, suite_name, m.ref, shard, m.role): ([m.role], len(shard))
                   for m in models for shard in shards}
    with tqdm(total=len(items) * len(models), desc=label or f"eval {suite_name}", unit="item") as progress:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            roles_done, size = pending.pop(done[0])
            got = ray.get(done[0])
            for role, out in zip(roles_done, got if isinstance(got, list) else [got]):
                merged = outputs[role]
                for key, value in out.items():
                    if key == "items":
                        merged["items"].extend(value)
                    elif isinstance(value, (int, float)) and key in merged:
                        merged[key] += value
                    else:
                        merged[key] = value
                progress.update(size)
    for merged in outputs.values():
        merged["items"].sort(key=lambda it: str(it["id"]) if isinstance(it["id"], str) else f"{it['id']:09d}")
    return outputs


def run_stage(config: ExperimentConfig, *, model_ref: str | None = None, suite_list: list[str] | None = None,
              json_out: Path | None = None, reports_dir: Path | None = None,
              trials: list[EvalModel] | None = None, names: list[str] | None = None) -> StageResult:
    """Score the candidate (`model_ref`, default the config's registered alias), the base and the champion."""


    names = names or suite_names(config, suite_list)
    check(config, names)
    models = models_to_score(config, model_ref, [t for t in trials or [] if t.same_as is None])
    candidate = models[0]
    judged = [m for m in models if not m.role.startswith("trial:")]  # the judge grades candidate, base, champion
    judge_names = judge_stage.modes(names)
    problems = judge_stage.check(config, judge_names, [m.role for m in judged])
    if problems:
        raise ConfigError(problems)
    log.info("evaluating %s (version %s) against %s with %s", candidate.ref, candidate.version,
             ", ".join(m.role for m in models[1:]), ", ".join(names))

    results: dict[str, Any] = {"model_ref": candidate.ref, "model_version": candidate.version,
                               "models": {m.role: {"ref": m.ref, "version": m.version} for m in models},
                               "suites": {}, "items": [], "failed": {}, "timing": {}}
    with ExitStack() as stack:
        # the judge first: an unreachable one exits 2 before any generation
        judge = stack.enter_context(judge_stage.session(config)) if judge_names else None
        cluster.connect_ray(config)
        results["adapters"] = _check_adapters(config, models)
        for role, found in results["adapters"].items():
            if not found["ok"]:
                results["failed"]["adapter" if role == "candidate" else f"adapter:{role}"] = found["reason"]
        if not results["adapters"].get("candidate", {"ok": True})["ok"]:
            names, judge = [], None  # nothing is scored: the candidate would be the base again
        models = [m for m in models if results["adapters"].get(m.role, {"ok": True})["ok"]]
        judged = [m for m in judged if m in models]
        for name in names:
            if name not in judge_names:
                _run_suite(config, name, models, results)
        if judge is not None:
            began = time.perf_counter()
            try:
                out = judge_stage.run(config, judge_names, judge, [m.role for m in judged],
                                      lambda suite_name, items: _gather(config, suite_name, judged, items,
                                                                               "judge: answers"))
            except ConfigError:
                raise
            except Exception as err:  # keep the other suites' results; say why the judge did not finish
                log.error("judge suites failed: %s: %s", err.__class__.__name__, err)
                for name in judge_names:
                    results["failed"][name] = f"{err.__class__.__name__}: {err}"
            else:
                results["suites"].update(out["suites"])
                results["items"] += out["items"]
                results["failed"].update(out["failed"])
                results["judge"], results["answers"] = out["judge"], out["answers"]
                for name in judge_names:
                    results["timing"][name] = {"wall_seconds": time.perf_counter() - began}
    results = _trials_apart(results, trials or [])
    if json_out is not None:
        write_json(results, json_out)
    report.print_table(results)
    run_id = report.log_results(config, results, reports_dir)
    return StageResult(results, dict(results["failed"]), run_id)


def _run_suite(config: ExperimentConfig, name: str, models: list[EvalModel], results: dict[str, Any]) -> None:
    """One benchmark suite over every model, into `results`; a failure is recorded, not raised."""
    began = time.perf_counter()
    try:
        items = catalog.get(name).items(config)
        outputs = _gather(config, name, models, items)
        per_model: dict[str, dict[str, float]] = {}
        for model in models:
            metrics, scored = catalog.get(name).score(config, outputs[model.role])
            per_model[model.role] = metrics
            results["items"] += [{"suite": name, "model": model.role, **item} for item in scored]
            if name == "lm_eval":
                results.setdefault("harness", {})[model.role] = outputs[model.role]["harness"]
    except ConfigError:
        raise
    except Exception as err:  # keep what finished; say which suite failed and why
        log.error("suite %s failed: %s: %s", name, err.__class__.__name__, err)
        results["failed"][name] = f"{err.__class__.__name__}: {err}"
        return
    results["suites"][name] = per_model
    gen = sum(outputs[m.role].get("gen_seconds", 0.0) for m in models)
    results["timing"][name] = {"wall_seconds": time.perf_counter() - began,
                               "task_seconds": sum(outputs[m.role]["seconds"] for m in models),
                               "generate_seconds": gen,
                               "generated_tokens": sum(outputs[m.role].get("gen_tokens", 0) for m in models)}


def _trials_apart(results: dict[str, Any], trials: list[EvalModel]) -> dict[str, Any]:
    """Trials' scores go under `trials` (with their sampled params); `suites` keeps candidate, base, champion."""
    out: dict[str, dict[str, Any]] = {}
    for trial in trials:
        scored = {}
        for suite_name, per_model in results["suites"].items():
            source = trial.same_as or trial.role
            if source in per_model:
                scored[suite_name] = per_model[source] if trial.same_as else per_model.pop(source)
        out[trial.role.removeprefix("trial:")] = {"ref": trial.ref, "params": trial.params, "suites": scored,
                                                  **({"same_as": trial.same_as} if trial.same_as else {})}
        results["models"].pop(trial.role, None)
    results["items"] = [it for it in results["items"] if not it["model"].startswith("trial:")]
    if out:
        results["trials"] = out
    return results


def validate(results: dict[str, Any]) -> None:
    import jsonschema

    jsonschema.validate(results, json.loads(SCHEMA_FILE.read_text()))


def write_json(results: dict[str, Any], path: Path) -> Path:
    """`--json`: validated, secrets masked (the judge's URL, error texts), replaced whole."""
    validate(results)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(path, json.dumps(redact.redact(results), indent=1, default=str))
    return path
