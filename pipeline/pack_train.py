"""The train loop of a packed trial: k configs on one frozen base, top to bottom (pipeline.pack).

`train_pack_per_worker` is handed to `TorchTrainer` for one pack. It loads the data and the
base once, attaches every config's adapter, then steps them all on each micro-batch. Every
`eval_every_steps` it evaluates each live config on the full eval set; at the rungs of
`sweep.asha` (grace_period·η^i evaluations) it keeps the top 1/η and stops the rest, so every
config is compared at the same step budget. Each evaluation writes one checkpoint: a
`loraforge.json` with the pack's state and, per config evaluated, an ordinary checkpoint
folder (PEFT adapter, its optimizer state, manifest), which Ray Train reports to Tune.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from pipeline import adapters, data, pack, tracking, trial_worker
from pipeline import checkpoint as ckpt
from pipeline.config import ExperimentConfig
from pipeline.strategies import Worker, strategy_for

PACK_FILE = adapters.METADATA_FILE  # the pack's own state sits where a solo checkpoint keeps its metadata


def member_trial_id(trial_id: str, name: str) -> str:
    """A packed config's trial id (its MLflow run's `loraforge.trial_id`): the pack's Tune trial id + its name."""
    return f"{trial_id}-{name}"


def _open_member_runs(first: ExperimentConfig, trial: dict[str, Any], members: list[pack.Member], model: Any,
                      params: dict[str, Any], resumed: bool, restarts: int, step: int, skipped: list[str]) -> Any:
    """One nested MLflow run per config of the pack, found again on a restart; the pack's system metrics."""
    mlflow_client = tracking.client(first.tracking.tracking_uri)
    for member in members:
        trainable = model.trainable(member.name)
        member.run_id = tracking.trial_run(
            mlflow_client, trial["experiment_id"], trial["parent_run_id"], member_trial_id(trial["trial_id"], member.name),
            f"{trial['trial_name']}-{member.name}", member.config, member.sampled, trial.get("lineage"))
        member.metric_buffer = tracking.MetricBuffer(mlflow_client, member.run_id)
        trial_worker.tag_node(mlflow_client, member.run_id)
        tracking.set_tags(mlflow_client, member.run_id, {
            "loraforge.pack": trial["trial_id"], "loraforge.pack_member": member.name,
            "loraforge.pack_size": str(len(members))})
        if not resumed:
            tracking.log_params(mlflow_client, member.run_id, {
                "trainable_params": trainable, "peft_trainable_params": trainable,
                "total_params": params["base_params"] + trainable, "train_examples": params["train_examples"],
                "eval_examples": params["eval_examples"], "total_steps": params["total_steps"], "world_size": 1,
                "pack_size": len(members)})
        else:
            trial_worker.tag_resume(mlflow_client, member.run_id, restarts, step, skipped, trial.get("checkpoints_gone"))
    # the pack's processes are shared: its CPU/RAM samples go to the first config's run
    return tracking.start_system_metrics(first, members[0].run_id, resume=resumed)


def _report(first: ExperimentConfig, members: list[pack.Member], model: Any, sweep: dict[str, Any],
            metrics_by_member: dict[str, dict[str, Any]], counts: dict[str, Any]) -> None:
    """One checkpoint for the configs evaluated now (and the pack's state), reported to Tune.

    `counts`: the loop's step, epoch, train_time_s, eval_time_s, restarts and tokens_seen at this point.
    """
    import ray.train

    evaluated = list(metrics_by_member)
    entries = {m.name: {"status": m.status, "stopped_step": m.stopped_step, "rung": m.rung, "error": m.error,
                        "mlflow_run_id": m.run_id, **metrics_by_member.get(m.name, {})}
               for m in members}
    scores = [metrics_by_member[n].get(sweep["metric"]) for n in evaluated]
    scores = [s for s in scores if s is not None and not math.isnan(s)]
    best = (max if sweep["mode"] == "max" else min)(scores) if scores else float("nan")
    step, restarts, tokens_seen = counts["step"], counts["restarts"], counts["tokens_seen"]
    shared = {**counts, "tokens_per_s": tokens_seen * len(evaluated) / max(counts["train_time_s"], 1e-9)}
    result = {sweep["metric"]: best, **shared, "live": sum(m.live for m in members), "pack": entries}
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        for member in members:
            if member.name not in evaluated:
                continue
            sub = directory / member.name
            model.save(member.name, sub, {
                "base_model": first.model.name_or_path, "task": first.data.kind,
                "num_labels": getattr(first.data, "num_labels", None), "trainable_params": model.trainable(member.name),
                "lora": member.config.lora.model_dump(), "strategy": first.strategy.model_dump(),
                "experiment": first.name, "world_size": 1, "step": step, "tokens_seen": tokens_seen,
                "restarts": restarts, "metrics": {**shared, **metrics_by_member[member.name]},
                "pack_member": member.name})
            ckpt.save_state(sub / ckpt.state_file(0), {"optimizer": member.optimizer.state_dict()})
            ckpt.write_manifest(sub, 0)
        ckpt.save_state(directory / ckpt.state_file(0), {"rng": torch.get_rng_state()})
        (directory / PACK_FILE).write_text(json.dumps({
            **shared, "world_size": 1, "experiment": first.name,
            "pack": {"saved": evaluated, "members": {n: {k: e[k] for k in ("status", "stopped_step", "rung")}
                                                     for n, e in entries.items()}},
        }, indent=1))
        ckpt.write_manifest(directory, 0)
        ray.train.report(result, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def train_pack_per_worker(loop_config: dict[str, Any]) -> None:
    """The one worker of one pack. `loop_config` = {"members": [{"config", "sampled"}], "trial": dict | None}."""
    import ray.train
    import ray.train.torch
    from tqdm import tqdm
    from transformers import get_scheduler

    configs = [ExperimentConfig.model_validate(m["config"]) for m in loop_config["members"]]
    first = configs[0]
    # the trial configs have no sweep section: the metric, mode and rungs come from the experiment's
    train_spec, sweep = first.train, loop_config["sweep"]
    trial = loop_config.get("trial")
    classification = adapters.is_classification(first.data)
    torch.set_num_threads(loop_config["threads"])
    torch.manual_seed(train_spec.seed)
    worker = Worker(rank=0, world_size=1, device=ray.train.torch.get_device())
    device = worker.device

    # ---- data, once for the pack: every config shares it, its seed and its batch order
    tokenizer, train_examples, eval_examples = trial_worker.load_examples(first)
    lengths = [len(e.input_ids) for e in train_examples]

    # ---- one frozen base, k adapters
    base = strategy_for(first, worker).load_base()
    model = pack.PackedLora(base, configs)
    members = [pack.Member(name, cfg, m["sampled"]) for name, cfg, m in zip(model.names, configs, loop_config["members"])]
    steps_per_epoch = data.steps_per_epoch(len(train_examples), train_spec.batch_size, train_spec.grad_accum, 1)
    total_steps = steps_per_epoch * train_spec.epochs
    for member in members:
        member.optimizer = pack.member_optimizer(model, member)
        t = member.config.train
        member.scheduler = get_scheduler(t.lr_scheduler, member.optimizer, num_training_steps=total_steps,
                                         num_warmup_steps=math.ceil(t.warmup_ratio * total_steps))
    rungs = (pack.rung_steps(train_spec.eval_every_steps, total_steps, sweep["grace_period"], sweep["reduction_factor"])
             if sweep["scheduler"] == "asha" else [])

    step, tokens_seen, loop_time, restarts, skipped = 0, 0, 0.0, 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        resume_dir, resumed, skipped = trial_worker.restore(checkpoint)
        state = resumed["pack"]
        step, tokens_seen = int(resumed["step"]), int(resumed.get("tokens_seen", 0))
        loop_time, restarts = float(resumed.get("train_time_s", 0.0)), int(resumed.get("restarts", 0)) + 1
        for member in members:
            entry = state["members"][member.name]
            member.status, member.stopped_step, member.rung = entry["status"], entry.get("stopped_step"), entry.get("rung")
            if member.live:
                model.load(member.name, resume_dir / member.name)
                saved = ckpt.load_state(resume_dir / member.name / ckpt.state_file(0))
                member.optimizer.load_state_dict(saved["optimizer"])
            for _ in range(step):
                member.scheduler.step()
        torch.set_rng_state(ckpt.load_state(resume_dir / ckpt.state_file(0))["rng"])
    model.model.to(device)

    # ---- tracking: one nested MLflow run per config, as for unpacked trials
    params = {"train_examples": len(train_examples), "eval_examples": len(eval_examples), "total_steps": total_steps,
              "base_params": sum(p.numel() for p in base.parameters())}
    system_metrics = (_open_member_runs(first, trial, members, model, params, checkpoint is not None, restarts, step,
                                        skipped) if trial else None)

    progress = tqdm(total=total_steps, initial=step, file=trial_worker.LineWriter(sys.stderr), mininterval=10, ascii=True,
                    ncols=100,
                    desc=f"pack of {len(members)} ({first.strategy.kind})")

    # ---- the loop
    model.model.train()
    micro_step, pad_id, eval_time = 0, tokenizer.pad_token_id, 0.0  # eval_time: since this worker group started
    wall_started, tokens_at_start = time.perf_counter(), tokens_seen  # the wall clock, as in pipeline.train
    for epoch in range(step // steps_per_epoch, train_spec.epochs):
        batches = data.make_batches(lengths, train_spec.batch_size, shuffle=True, seed=train_spec.seed + epoch,
                                    bucketing=train_spec.length_bucketing, rank=0, world_size=1)
        batches = batches[(step - epoch * steps_per_epoch) * train_spec.grad_accum: steps_per_epoch * train_spec.grad_accum]
        started = time.perf_counter()
        for indices in batches:
            if not any(m.live for m in members):
                break
            batch = {k: v.to(device) for k, v in data.collate([train_examples[i] for i in indices], pad_id).items()}
            losses = pack.backward(model, members, batch, train_spec.grad_accum, classification, step)
            for member in members:
                if member.name in losses:
                    member.window.append(losses[member.name])
            micro_step += 1
            tokens_seen += int(batch["attention_mask"].sum())
            if micro_step % train_spec.grad_accum:
                continue
            grad_norms = {m.name: pack.clip_and_step(model, m) for m in members if m.live}
            step += 1
            progress.update(1)
            if step % train_spec.log_every_steps == 0:
                for member in members:
                    if member.metric_buffer is not None and member.window and member.name in grad_norms:
                        logged = {"train_loss": sum(member.window) / len(member.window),
                                  "lr": member.scheduler.get_last_lr()[0]}
                        if grad_norms[member.name] is not None:
                            logged["grad_norm"] = grad_norms[member.name]
                        member.metric_buffer.log(logged, step)
                    member.window.clear()
            if step % train_spec.eval_every_steps == 0 or step == total_steps:
                loop_time += time.perf_counter() - started
                eval_started = time.perf_counter()
                metrics: dict[str, dict[str, Any]] = {}
                for member in members:
                    if not member.live:
                        continue
                    with model.only(member.name):
                        scores = trial_worker.evaluate(model.model, eval_examples, member.config, pad_id, device, 0, 1)
                    metrics[member.name] = {**scores, "lr": member.scheduler.get_last_lr()[0],
                                            "trainable_params": model.trainable(member.name), "worker_restarts": restarts}
                    if member.metric_buffer is not None:
                        member.metric_buffer.log(scores, step)
                        member.metric_buffer.flush(wait=True)
                eval_time += time.perf_counter() - eval_started
                if step in rungs and len(metrics) > 1:
                    keep = pack.survivors({n: v.get(sweep["metric"]) for n, v in metrics.items()},
                                          sweep["reduction_factor"], sweep["mode"])
                    for member in members:
                        if member.name in metrics and member.name not in keep:
                            member.status, member.stopped_step, member.rung = "STOPPED", step, rungs.index(step)
                if step == total_steps:
                    for member in members:
                        if member.live:
                            member.status, member.stopped_step = "DONE", step
                counts = {"step": step, "epoch": step / steps_per_epoch, "train_time_s": loop_time,
                          "eval_time_s": eval_time, "restarts": restarts, "tokens_seen": tokens_seen,
                          **trial_worker.wall_clock(wall_started, (tokens_seen - tokens_at_start) * len(metrics))}
                _report(first, members, model, sweep, metrics, counts)
                started = time.perf_counter()
        loop_time += time.perf_counter() - started
    if any(m.status == "ERROR" and m.stopped_step is not None for m in members) and not any(m.live for m in members):
        # every config stopped on a non-finite loss: the driver learns why
        counts = {"step": step, "epoch": step / steps_per_epoch, "train_time_s": loop_time,
                  "eval_time_s": eval_time, "restarts": restarts, "tokens_seen": tokens_seen}
        _report(first, members, model, sweep, {}, counts)
    progress.close()
    for member in members:
        if member.metric_buffer is not None:
            member.metric_buffer.close()
    if system_metrics is not None:
        system_metrics.finish()
