"""The per-worker train loop: what every Ray Train worker of a trial runs, top to bottom.

`train_fn_per_worker` is handed to `TorchTrainer`. It rebuilds the typed config,
loads and tokenizes the data, asks the memory strategy for the model and
optimizer, then runs AdamW with a warmup + decay schedule, evaluates every
`eval_every_steps` steps on the full eval set (sharded across workers, counts
summed) and reports metrics + an adapter-only checkpoint to Ray Train, which
forwards them to Tune (ASHA decides from them).
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from pipeline import adapters, benchmarks, data, tracking
from pipeline.config import ExperimentConfig
from pipeline.strategies import strategy_for


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
    if adapters.is_classification(config.data):
        num_labels = config.data.num_labels
        confusion = torch.zeros(num_labels, num_labels, dtype=torch.float64)
        for start in range(0, len(order), batch_size):
            batch = data.collate([shard[i] for i in order[start : start + batch_size]], pad_token_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            confusion += benchmarks.confusion_matrix(logits.argmax(-1).cpu(), batch["labels"].cpu(), num_labels)
        model.train()
        metrics = benchmarks.classification_metrics(_all_reduce_sum(confusion.to(device), world_size).cpu())
    else:
        sums = torch.zeros(2, dtype=torch.float64)
        for start in range(0, len(order), batch_size):
            batch = data.collate([shard[i] for i in order[start : start + batch_size]], pad_token_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
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


def train_fn_per_worker(loop_config: dict[str, Any]) -> None:
    """One worker of one trial. `loop_config` = {"experiment": config dict, "mlflow_run_id": str | None}."""
    import ray.train
    import ray.train.torch
    from tqdm import tqdm
    from transformers import get_scheduler

    config = ExperimentConfig.model_validate(loop_config["experiment"])
    train_spec = config.train
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    # Ray sizes OMP threads from the worker's CPUs; torch must agree or workers oversubscribe cores
    torch.set_num_threads(train_spec.cpus_per_worker)
    torch.manual_seed(train_spec.seed)
    device = ray.train.torch.get_device()

    # ---- data: every worker tokenizes (fast tokenizers: ~1 s per 10k rows), then takes its shard
    tokenizer = adapters.load_tokenizer(config.model, config.data)
    train_examples = data.with_targets(
        data.tokenize_rows(config.data, data.load_split(config.data, "train", train_spec.seed), tokenizer))
    eval_examples = data.tokenize_rows(config.data, data.load_split(config.data, "eval", train_spec.seed), tokenizer)
    lengths = [len(e.input_ids) for e in train_examples]

    # ---- model and optimizer, from the memory strategy (the loop never asks which one)
    strategy = strategy_for(config)
    model = strategy.load_model()
    peft_model = adapters.unwrap(model)
    trainable, total = peft_model.get_nb_trainable_parameters()
    optimizer = strategy.build_optimizer(model)
    steps_per_epoch = data.steps_per_epoch(len(train_examples), train_spec.batch_size, train_spec.grad_accum, world_size)
    total_steps = steps_per_epoch * train_spec.epochs
    scheduler = get_scheduler(
        train_spec.lr_scheduler, optimizer,
        num_warmup_steps=math.ceil(train_spec.warmup_ratio * total_steps), num_training_steps=total_steps,
    )

    metric_buffer = None
    if rank == 0 and loop_config.get("mlflow_run_id"):
        mlflow_client = tracking.client(config.tracking.tracking_uri)
        metric_buffer = tracking.MetricBuffer(mlflow_client, loop_config["mlflow_run_id"])
        counted = adapters.trainable_parameters(peft_model)
        tracking.log_params(mlflow_client, loop_config["mlflow_run_id"], {
            "trainable_params": counted, "peft_trainable_params": trainable, "total_params": total,
            "train_examples": len(train_examples), "eval_examples": len(eval_examples),
            "total_steps": total_steps, "world_size": world_size,
        })
    metadata_base = {
        "base_model": config.model.name_or_path, "task": config.data.kind,
        "num_labels": getattr(config.data, "num_labels", None), "trainable_params": trainable,
        "lora": config.lora.model_dump(), "experiment": config.name,
    }
    progress = None
    if rank == 0:
        # one plain line per refresh: Ray forwards worker output line by line, and a trial
        # that ASHA stops is killed, so a redrawn bar would be left dangling in the driver
        progress = tqdm(total=total_steps, desc=f"r={config.lora.r} {'+'.join(config.lora.target_modules)}",
                        file=_LineWriter(sys.stderr), mininterval=10, ascii=True, ncols=100)

    # ---- the loop
    model.train()
    step, micro_step, tokens_seen, loop_time = 0, 0, 0, 0.0
    window_loss, window_count = 0.0, 0
    pad_id = tokenizer.pad_token_id
    for epoch in range(train_spec.epochs):
        batches = data.make_batches(
            lengths, train_spec.batch_size, shuffle=True, seed=train_spec.seed + epoch,
            bucketing=train_spec.length_bucketing, rank=rank, world_size=world_size,
        )
        # whole optimizer steps only, so every rank takes the same number of steps
        batches = batches[: steps_per_epoch * train_spec.grad_accum]
        started = time.perf_counter()
        for indices in batches:
            batch = data.collate([train_examples[i] for i in indices], pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = model(**batch).loss / train_spec.grad_accum
            if not torch.isfinite(loss):
                # stop the trial now: nothing after a non-finite loss is reported or checkpointed
                raise FloatingPointError(f"non-finite loss at step {step} (rank {rank}): {loss.item()}")
            strategy.backward(loss)
            micro_step += 1
            tokens_seen += int(batch["attention_mask"].sum())
            window_loss += float(loss) * train_spec.grad_accum
            window_count += 1
            if micro_step % train_spec.grad_accum:
                continue
            grad_norm = strategy.step(model, optimizer)
            scheduler.step()
            step += 1
            if progress is not None:
                progress.update(1)
            if metric_buffer is not None and step % train_spec.log_every_steps == 0:
                logged = {"train_loss": window_loss / window_count, "lr": scheduler.get_last_lr()[0]}
                if grad_norm is not None:
                    logged["grad_norm"] = grad_norm
                metric_buffer.log(logged, step)
                window_loss, window_count = 0.0, 0

            if step % train_spec.eval_every_steps == 0 or step == total_steps:
                loop_time += time.perf_counter() - started
                metrics = evaluate(model, eval_examples, config, pad_id, device, rank, world_size)
                metrics.update({
                    "step": step, "epoch": step / steps_per_epoch, "train_time_s": loop_time,
                    "tokens_per_s": tokens_seen * world_size / max(loop_time, 1e-9),
                    "trainable_params": trainable,
                })
                if metric_buffer is not None:
                    metric_buffer.log({k: v for k, v in metrics.items() if k.startswith("eval_")}, step)
                    metric_buffer.flush()
                with tempfile.TemporaryDirectory() as tmp:
                    strategy.save_adapter(model, Path(tmp), {**metadata_base, "step": step, "metrics": metrics})
                    checkpoint = ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None
                    ray.train.report(metrics, checkpoint=checkpoint)
                started = time.perf_counter()
        loop_time += time.perf_counter() - started
    if progress is not None:
        progress.close()
    if metric_buffer is not None:
        metric_buffer.flush()
