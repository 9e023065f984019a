"""The per-worker train loop: what every Ray Train worker of a trial runs, top to bottom.

`train_fn_per_worker` is handed to `TorchTrainer`. It rebuilds the typed config,
loads and tokenizes the data, asks the memory strategy for the model and
optimizer, then runs AdamW with a warmup + decay schedule, evaluates every
`eval_every_steps` steps on the full eval set (sharded across workers, counts
summed) and reports metrics + an adapter-only checkpoint to Ray Train, which
forwards them to Tune (ASHA decides from them).
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

from pipeline import adapters, data, tracking, trial_worker
from pipeline import checkpoint as ckpt
from pipeline.config import ExperimentConfig
from pipeline.strategies import Worker, strategy_for

EVA_BATCHES = 8  # training batches lora.init eva takes its SVD over (PEFT's EVA stops early once ranks converge)


def _checkpoint_metadata(config: ExperimentConfig, trainable: int, world_size: int) -> dict[str, Any]:
    """What every checkpoint's loraforge.json says about the run (the step and metrics are added per checkpoint)."""
    return {"base_model": config.model.name_or_path, "task": config.data.kind,
            "num_labels": getattr(config.data, "num_labels", None), "trainable_params": trainable,
            "lora": config.lora.model_dump(), "strategy": config.strategy.model_dump(), "experiment": config.name,
            "world_size": world_size}


def _resume_state(strategy: Any, scheduler: Any, resume_dir: Path, resumed: dict[str, Any], rank: int,
                  from_pbt: bool) -> tuple[int, int, float, int]:
    """Optimizer, RNG and schedule back where the checkpoint left them; (step, tokens seen, train time, restarts)."""
    state = ckpt.load_state(resume_dir / ckpt.state_file(rank))
    strategy.load_optimizer_state(state["optimizer"])
    torch.set_rng_state(state["rng"])
    step = int(resumed["step"])
    for _ in range(step):
        scheduler.step()
    # a PBT start is this run's first, not a restart of the run it was copied from
    restarts = 0 if from_pbt else int(resumed.get("restarts", 0)) + 1
    return step, int(resumed.get("tokens_seen", 0)), float(resumed.get("metrics", {}).get("train_time_s", 0.0)), restarts


def _open_trial_run(config: ExperimentConfig, trial: dict[str, Any], params: dict[str, Any], resume_dir: Path | None,
                    pbt_origin: dict[str, Any] | None, restarts: int, step: int, skipped: list[str]) -> tuple[Any, Any]:
    """Rank 0: find or create the trial's MLflow run and record how it started; (metric buffer, system metrics)."""
    mlflow_client = tracking.client(config.tracking.tracking_uri)
    run_id = tracking.trial_run(mlflow_client, trial["experiment_id"], trial["parent_run_id"], trial["trial_id"],
                                trial["trial_name"], config, trial["sampled"], trial.get("lineage"))
    trial_worker.tag_node(mlflow_client, run_id)
    system_metrics = tracking.start_system_metrics(config, run_id, resume=resume_dir is not None)
    if resume_dir is None:
        tracking.log_params(mlflow_client, run_id, params)
    elif pbt_origin:
        # PBT: this trial continues from a copy of a better trial's checkpoint with a new train.lr
        generation = pbt_origin["generation"]
        mlflow_client.set_tag(run_id, "loraforge.pbt_generation", str(generation))
        mlflow_client.set_tag(run_id, f"loraforge.pbt.{generation}", json.dumps({
            "step": step, "train.lr": config.train.lr, "from_trial": pbt_origin["trial_id"],
            "from_checkpoint": pbt_origin["checkpoint"], "from_result": pbt_origin["result"]}))
    else:
        trial_worker.tag_resume(mlflow_client, run_id, restarts, step, skipped, trial.get("checkpoints_gone"), resume_dir)
    return tracking.MetricBuffer(mlflow_client, run_id), system_metrics


def train_fn_per_worker(loop_config: dict[str, Any]) -> None:
    """One worker of one trial. `loop_config` = {"experiment": config dict, "trial": dict | None}.

    `trial` names the sweep's MLflow parent run and this trial (ids, sampled values, start
    time); rank 0 finds the trial's nested run (a restarted worker group) or creates it.

    A worker group restarted by Ray Train (`train.max_failures`) resumes from the
    trial's latest valid checkpoint: adapter weights, optimizer and RNG state, step
    and position in the epoch.
    """
    import psutil
    import ray.train
    import ray.train.torch
    from tqdm import tqdm
    from transformers import get_scheduler

    # > 0: this process was started before its trial was (a warm-pool worker); < 0: on demand
    worker_head_start = (loop_config.get("trial") or {}).get("started", time.time()) - psutil.Process().create_time()
    config = ExperimentConfig.model_validate(loop_config["experiment"])
    train_spec = config.train
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    # Ray sizes OMP threads from the worker's CPUs; torch must agree or workers oversubscribe cores
    torch.set_num_threads(train_spec.cpus_per_worker)
    torch.manual_seed(train_spec.seed)
    worker = Worker(rank=rank, world_size=world_size, device=ray.train.torch.get_device())
    device = worker.device

    # ---- data: every worker tokenizes, then takes its shard
    tokenizer, train_examples, eval_examples = trial_worker.load_examples(config)
    lengths = [len(e.input_ids) for e in train_examples]

    # ---- resume point: Ray restarted this worker group, or PBT started this run from a better trial's copy
    resume_dir, resumed, skipped, pbt_origin = None, {}, [], None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and (init := (loop_config.get("trial") or {}).get("init_checkpoint")):
        checkpoint = ray.train.Checkpoint(init)
        pbt_origin = loop_config["trial"]["pbt_origin"]
    if checkpoint is not None:
        resume_dir, resumed, skipped = trial_worker.restore(checkpoint)

    # ---- model and optimizer, from the memory strategy (the loop never asks which one)
    strategy = strategy_for(config, worker)
    peft_model = strategy.load_model()
    if resume_dir is not None:
        adapters.load_adapter_weights(peft_model, resume_dir)
    elif config.lora.init == "eva":  # A from the SVD of the adapted layers' inputs on this rank's first batches
        first = data.make_batches(lengths, train_spec.batch_size, shuffle=True, seed=train_spec.seed,
                                  bucketing=train_spec.length_bucketing, rank=rank, world_size=world_size)[:EVA_BATCHES]
        adapters.eva_init(peft_model, [{k: v.to(worker.device) for k, v in
                                        data.collate([train_examples[i] for i in b], tokenizer.pad_token_id).items()}
                                       for b in first])
    trainable, total = peft_model.get_nb_trainable_parameters()
    model, optimizer = strategy.wrap(peft_model)
    steps_per_epoch = data.steps_per_epoch(len(train_examples), train_spec.batch_size, train_spec.grad_accum, world_size)
    total_steps = steps_per_epoch * train_spec.epochs
    scheduler = get_scheduler(
        train_spec.lr_scheduler, optimizer,
        num_warmup_steps=math.ceil(train_spec.warmup_ratio * total_steps), num_training_steps=total_steps,
    )
    step, tokens_seen, loop_time, restarts = 0, 0, 0.0, 0
    if resume_dir is not None:
        step, tokens_seen, loop_time, restarts = _resume_state(strategy, scheduler, resume_dir, resumed, rank,
                                                               from_pbt=pbt_origin is not None)

    metric_buffer, system_metrics = None, None
    if rank == 0 and (trial := loop_config.get("trial")):
        params = {"trainable_params": adapters.trainable_parameters(peft_model), "peft_trainable_params": trainable,
                  "total_params": total, "train_examples": len(train_examples), "eval_examples": len(eval_examples),
                  "total_steps": total_steps, "world_size": world_size}
        metric_buffer, system_metrics = _open_trial_run(config, trial, params, resume_dir, pbt_origin, restarts, step,
                                                        skipped)
    metadata_base = _checkpoint_metadata(config, trainable, world_size)
    progress = None
    if rank == 0:
        # one plain line per refresh: Ray forwards worker output line by line, and a trial
        # that ASHA stops is killed, so a redrawn bar would be left dangling in the driver
        progress = tqdm(total=total_steps, initial=step, file=trial_worker.LineWriter(sys.stderr), mininterval=10, ascii=True,
                        ncols=100, desc=f"{config.strategy.kind} r={config.lora.r} {config.lora.targets_label}")

    # ---- the loop
    model.train()
    micro_step, eval_time = 0, 0.0  # eval_time: seconds in evaluations since this worker group started
    # the wall clock over everything the loop does (evaluations, tracking, checkpoints, reports to Tune), since this
    # worker group started: what a user waits for, where train_time_s counts the training steps only
    wall_started, tokens_at_start = time.perf_counter(), tokens_seen
    window_loss, window_count = 0.0, 0
    pad_id = tokenizer.pad_token_id
    for epoch in range(step // steps_per_epoch, train_spec.epochs):
        batches = data.make_batches(
            lengths, train_spec.batch_size, shuffle=True, seed=train_spec.seed + epoch,
            bucketing=train_spec.length_bucketing, rank=rank, world_size=world_size,
        )
        # whole optimizer steps only, so every rank takes the same number of steps; a resumed
        # epoch skips the batches its steps already consumed
        batches = batches[(step - epoch * steps_per_epoch) * train_spec.grad_accum : steps_per_epoch * train_spec.grad_accum]
        started = time.perf_counter()
        for indices in batches:
            batch = data.collate([train_examples[i] for i in indices], pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = model(**batch).loss / train_spec.grad_accum
            if bad_ranks := trial_worker.nonfinite_ranks(loss, rank, world_size):
                # stop the trial now, on every rank: nothing after a non-finite loss is reported or checkpointed
                raise FloatingPointError(
                    f"non-finite loss at step {step} (rank {', '.join(map(str, bad_ranks))}); last checkpoint is "
                    f"at or before step {step}. Lower train.lr or check the data")
            strategy.backward(loss)
            micro_step += 1
            tokens_seen += int(batch["attention_mask"].sum())
            window_loss += float(loss.detach()) * train_spec.grad_accum
            window_count += 1
            if micro_step % train_spec.grad_accum:
                continue
            grad_norm = strategy.step()
            scheduler.step()
            step += 1
            if progress is not None:
                progress.update(1)
            if metric_buffer is not None and step % train_spec.log_every_steps == 0:
                logged = {"train_loss": window_loss / window_count, "lr": scheduler.get_last_lr()[0],
                          **strategy.step_metrics()}
                if grad_norm is not None:
                    logged["grad_norm"] = grad_norm
                metric_buffer.log(logged, step)
                window_loss, window_count = 0.0, 0

            if step % train_spec.eval_every_steps == 0 or step == total_steps:
                loop_time += time.perf_counter() - started
                eval_started = time.perf_counter()
                metrics = trial_worker.evaluate(model, eval_examples, config, pad_id, device, rank, world_size)
                eval_time += time.perf_counter() - eval_started
                metrics.update({
                    "eval_time_s": eval_time,
                    "step": step, "epoch": step / steps_per_epoch, "lr": scheduler.get_last_lr()[0], "train_time_s": loop_time,
                    "tokens_per_s": tokens_seen * world_size / max(loop_time, 1e-9),
                    **trial_worker.wall_clock(wall_started, (tokens_seen - tokens_at_start) * world_size),
                    "trainable_params": trainable, "worker_restarts": restarts, "worker_head_start_s": worker_head_start,
                })
                if metric_buffer is not None:
                    metric_buffer.log({k: v for k, v in metrics.items() if k.startswith("eval_")}, step)
                    # a checkpoint's metrics are on the server before Tune hears of it (ASHA may stop the trial)
                    metric_buffer.flush(wait=True)
                    # the driver closes this run when the trial ends, without searching a server that may be away
                    metrics["mlflow_run_id"] = metric_buffer.run_id
                with tempfile.TemporaryDirectory() as tmp:
                    trial_worker.write_checkpoint(Path(tmp), strategy, rank, {
                        **metadata_base, "step": step, "metrics": metrics, "tokens_seen": tokens_seen,
                        "restarts": restarts,
                    })
                    # reported only after every file is written: a failed write never becomes "latest"
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
                started = time.perf_counter()
        loop_time += time.perf_counter() - started
    if progress is not None:
        progress.close()
    if metric_buffer is not None:
        metric_buffer.close()
    if system_metrics is not None:
        system_metrics.finish()
