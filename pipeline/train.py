"""The per-worker train loop: what every Ray Train worker of a trial runs, top to bottom.

`train_fn_per_worker` is handed to `TorchTrainer`. It rebuilds the typed config,
loads and tokenizes the data, asks the memory strategy for the model and
optimizer, then runs AdamW with a warmup + decay schedule, evaluates every
`eval_every_steps` steps on the full eval set (sharded across workers, counts
summed) and reports metrics + an adapter-only checkpoint to Ray Train, which
forwards them to Tune (ASHA decides from them).
"""

from __future__ import annotations

import errno
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from pipeline import adapters, benchmarks, data, tracking
from pipeline import checkpoint as ckpt
from pipeline.config import ExperimentConfig
from pipeline.strategies import MemoryStrategy, Worker, strategy_for


class _LineWriter:
    """File-like that turns tqdm's carriage-return redraws into whole lines."""

    def __init__(self, stream: Any):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def _all_reduce_sum(tensor: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size > 1:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


@torch.no_grad()
def evaluate(model: torch.nn.Module, examples: list[data.Example], config: ExperimentConfig,
             pad_token_id: int, device: torch.device, rank: int, world_size: int) -> dict[str, float]:
    """Metrics on the whole eval set: each rank scores its shard, the counts are summed."""
    model.eval()
    shard = examples[rank::world_size]
    order = sorted(range(len(shard)), key=lambda i: len(shard[i].input_ids))
    batch_size = config.eval.batch_size
    # every rank runs the same number of forward passes (ZeRO-3 all-gathers parameters
    # in each one); a rank whose shard is a batch short repeats one example and ignores it
    num_batches = math.ceil(math.ceil(len(examples) / world_size) / batch_size)

    def batches() -> Any:
        for start in range(0, num_batches * batch_size, batch_size):
            chosen = [shard[i] for i in order[start : start + batch_size]]
            batch = data.collate(chosen or examples[:1], pad_token_id)
            yield bool(chosen), {k: v.to(device) for k, v in batch.items()}

    if adapters.is_classification(config.data):
        num_labels = config.data.num_labels
        confusion = torch.zeros(num_labels, num_labels, dtype=torch.float64)
        for real, batch in batches():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            if real:
                confusion += benchmarks.confusion_matrix(logits.argmax(-1).cpu(), batch["labels"].cpu(), num_labels)
        model.train()
        metrics = benchmarks.classification_metrics(_all_reduce_sum(confusion.to(device), world_size).cpu())
    else:
        sums = torch.zeros(2, dtype=torch.float64)
        for real, batch in batches():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            if not real:
                continue
            # the model shifts labels itself for its own loss; do the same to sum, not average
            targets = batch["labels"][:, 1:]
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                ignore_index=data.IGNORE_INDEX, reduction="sum",
            )
            sums += torch.tensor([float(loss), float((targets != data.IGNORE_INDEX).sum())], dtype=torch.float64)
        model.train()
        metrics = benchmarks.language_model_metrics(*_all_reduce_sum(sums.to(device), world_size).cpu().tolist())
    return {f"eval_{k}": v for k, v in metrics.items()}


def _nonfinite_ranks(loss: torch.Tensor, rank: int, world_size: int) -> list[int]:
    """Ranks whose loss is NaN/Inf at this step, known to every rank so all stop at the same step."""
    flags = torch.zeros(world_size, device=loss.device)
    flags[rank] = 0.0 if torch.isfinite(loss.detach()).all() else 1.0
    return [r for r, bad in enumerate(_all_reduce_sum(flags, world_size).tolist()) if bad]


def _restore(checkpoint: Any) -> tuple[Path, dict[str, Any], list[str]]:
    """(checkpoint dir to resume from, its loraforge.json, problems of newer ones skipped)."""
    import pyarrow.fs

    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        directory, skipped = ckpt.choose_resume(Path(checkpoint.path))
    else:
        # remote storage: no sibling listing here; the latest must verify
        directory = Path(checkpoint.to_directory())
        problems = ckpt.verify(directory)
        if problems:
            raise ckpt.CheckpointError("latest checkpoint is invalid, refusing to start over: " + "; ".join(problems))
        skipped = []
    return directory, adapters.read_metadata(directory), skipped


def _write_checkpoint(directory: Path, strategy: MemoryStrategy, rank: int, metadata: dict[str, Any]) -> None:
    """This rank's part of a checkpoint: the adapter (rank 0), its train state, its manifest."""
    try:
        strategy.save_adapter(directory, metadata)
        ckpt.save_state(directory / ckpt.state_file(rank), {
            "optimizer": strategy.optimizer_state(), "rng": torch.get_rng_state(),
        })
        ckpt.write_manifest(directory, rank)
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise OSError(errno.ENOSPC, f"disk full at {directory} while writing a checkpoint; free space "
                          "or point TMPDIR at a larger disk") from err
        raise


def _tag_node(mlflow_client: Any, run_id: str) -> None:
    """Which Ray node runs rank 0 now (`loraforge.node_id`), and every node it ran on (`loraforge.node_ids`)."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    earlier = mlflow_client.get_run(run_id).data.tags.get("loraforge.node_ids", "")
    nodes = [n for n in earlier.split(",") if n]
    if not nodes or nodes[-1] != node:
        nodes.append(node)
    tracking.set_tags(mlflow_client, run_id, {"loraforge.node_id": node, "loraforge.node_ids": ",".join(nodes)})


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

    # ---- data: every worker tokenizes (fast tokenizers: ~1 s per 10k rows), then takes its shard
    tokenizer = adapters.load_tokenizer(config.model, config.data)
    train_examples = data.with_targets(
        data.tokenize_rows(config.data, data.load_split(config.data, "train", train_spec.seed), tokenizer))
    eval_examples = data.tokenize_rows(config.data, data.load_split(config.data, "eval", train_spec.seed), tokenizer)
    lengths = [len(e.input_ids) for e in train_examples]

    # ---- resume point: Ray restarted this worker group, or PBT started this run from a better trial's copy
    resume_dir, resumed, skipped, pbt_origin = None, {}, [], None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and (init := (loop_config.get("trial") or {}).get("init_checkpoint")):
        checkpoint = ray.train.Checkpoint(init)
        pbt_origin = loop_config["trial"]["pbt_origin"]
    if checkpoint is not None:
        resume_dir, resumed, skipped = _restore(checkpoint)

    # ---- model and optimizer, from the memory strategy (the loop never asks which one)
    strategy = strategy_for(config, worker)
    peft_model = strategy.load_model()
    if resume_dir is not None:
        adapters.load_adapter_weights(peft_model, resume_dir)
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
        state = ckpt.load_state(resume_dir / ckpt.state_file(rank))
        strategy.load_optimizer_state(state["optimizer"])
        torch.set_rng_state(state["rng"])
        step = int(resumed["step"])
        tokens_seen = int(resumed.get("tokens_seen", 0))
        loop_time = float(resumed.get("metrics", {}).get("train_time_s", 0.0))
        # a PBT start is this run's first, not a restart of the run it was copied from
        restarts = 0 if pbt_origin else int(resumed.get("restarts", 0)) + 1
        for _ in range(step):
            scheduler.step()

    metric_buffer, system_metrics = None, None
    if rank == 0 and (trial := loop_config.get("trial")):
        mlflow_client = tracking.client(config.tracking.tracking_uri)
        run_id = tracking.trial_run(mlflow_client, trial["experiment_id"], trial["parent_run_id"], trial["trial_id"],
                                    trial["trial_name"], config, trial["sampled"], trial.get("lineage"))
        metric_buffer = tracking.MetricBuffer(mlflow_client, run_id)
        _tag_node(mlflow_client, run_id)
        system_metrics = tracking.start_system_metrics(config, run_id, resume=resume_dir is not None)
        if resume_dir is None:
            tracking.log_params(mlflow_client, run_id, {
                "trainable_params": adapters.trainable_parameters(peft_model), "peft_trainable_params": trainable,
                "total_params": total, "train_examples": len(train_examples), "eval_examples": len(eval_examples),
                "total_steps": total_steps, "world_size": world_size,
            })
        elif pbt_origin:
            # PBT: this trial continues from a copy of a better trial's checkpoint with a new train.lr
            generation = pbt_origin["generation"]
            mlflow_client.set_tag(run_id, "loraforge.pbt_generation", str(generation))
            mlflow_client.set_tag(run_id, f"loraforge.pbt.{generation}", json.dumps({
                "step": step, "train.lr": train_spec.lr, "from_trial": pbt_origin["trial_id"],
                "from_checkpoint": pbt_origin["checkpoint"], "from_result": pbt_origin["result"]}))
        else:
            mlflow_client.set_tag(run_id, "loraforge.worker_restarts", str(restarts))
            mlflow_client.set_tag(run_id, "loraforge.resumed_from_step", str(step))
            if skipped:
                mlflow_client.set_tag(run_id, "loraforge.ckpt_fallback", f"{resume_dir}: skipped {'; '.join(skipped)}"[:5000])
            if gone := (loop_config.get("trial") or {}).get("checkpoints_gone"):
                mlflow_client.set_tag(run_id, "loraforge.ckpt_missing", ",".join(gone)[:5000])
    metadata_base = {
        "base_model": config.model.name_or_path, "task": config.data.kind,
        "num_labels": getattr(config.data, "num_labels", None), "trainable_params": trainable,
        "lora": config.lora.model_dump(), "strategy": config.strategy.model_dump(), "experiment": config.name,
        "world_size": world_size,
    }
    progress = None
    if rank == 0:
        # one plain line per refresh: Ray forwards worker output line by line, and a trial
        # that ASHA stops is killed, so a redrawn bar would be left dangling in the driver
        progress = tqdm(total=total_steps, initial=step, file=_LineWriter(sys.stderr), mininterval=10, ascii=True,
                        ncols=100, desc=f"{config.strategy.kind} r={config.lora.r} {config.lora.targets_label}")

    # ---- the loop
    model.train()
    micro_step, eval_time = 0, 0.0  # eval_time: seconds in evaluations since this worker group started
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
            if bad_ranks := _nonfinite_ranks(loss, rank, world_size):
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
                metrics = evaluate(model, eval_examples, config, pad_id, device, rank, world_size)
                eval_time += time.perf_counter() - eval_started
                metrics.update({
                    "eval_time_s": eval_time,
                    "step": step, "epoch": step / steps_per_epoch, "lr": scheduler.get_last_lr()[0], "train_time_s": loop_time,
                    "tokens_per_s": tokens_seen * world_size / max(loop_time, 1e-9),
                    "trainable_params": trainable, "worker_restarts": restarts, "worker_head_start_s": worker_head_start,
                })
                if metric_buffer is not None:
                    metric_buffer.log({k: v for k, v in metrics.items() if k.startswith("eval_")}, step)
                    # a checkpoint's metrics are on the server before Tune hears of it (ASHA may stop the trial)
                    metric_buffer.flush(wait=True)
                    # the driver closes this run when the trial ends, without searching a server that may be away
                    metrics["mlflow_run_id"] = metric_buffer.run_id
                with tempfile.TemporaryDirectory() as tmp:
                    _write_checkpoint(Path(tmp), strategy, rank, {
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
