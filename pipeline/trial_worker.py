"""The per-worker plumbing both train loops share (pipeline.train: one adapter; pipeline.pack_train: a pack).

Each loop stays written out top to bottom in its own module; what they both need lives here:
loading the examples, restoring from a checkpoint, writing one, scoring the eval set, the MLflow
tags a resumed run gets, the node a run is on, and progress lines for logs.
"""

from __future__ import annotations

import errno
import math
import time
from pathlib import Path
from typing import Any

import torch

from pipeline import adapters, benchmarks, data, tracking
from pipeline import checkpoint as ckpt
from pipeline.config import ExperimentConfig
from pipeline.strategies import MemoryStrategy


def load_examples(config: ExperimentConfig) -> tuple[Any, list[data.Example], list[data.Example]]:
    """(tokenizer, training examples with their targets, eval examples): every worker tokenizes (fast tokenizers
    take about 1 s per 10k rows), with the config's seed for subsets."""
    tokenizer = adapters.load_tokenizer(config.model, config.data)
    seed = config.train.seed
    train_examples = data.with_targets(data.tokenize_rows(config.data, data.load_split(config.data, "train", seed),
                                                          tokenizer))
    eval_examples = data.tokenize_rows(config.data, data.load_split(config.data, "eval", seed), tokenizer)
    return tokenizer, train_examples, eval_examples


def tag_resume(mlflow_client: Any, run_id: str, restarts: int, step: int, skipped: list[str],
               gone: list[str] | None = None, resume_dir: Path | None = None) -> None:
    """What a restarted run records: how many restarts, the step it resumed from, checkpoints it skipped or lost."""
    mlflow_client.set_tag(run_id, "loraforge.worker_restarts", str(restarts))
    mlflow_client.set_tag(run_id, "loraforge.resumed_from_step", str(step))
    if skipped:
        where = f"{resume_dir}: skipped " if resume_dir is not None else ""
        mlflow_client.set_tag(run_id, "loraforge.ckpt_fallback", f"{where}{'; '.join(skipped)}"[:5000])
    if gone:
        mlflow_client.set_tag(run_id, "loraforge.ckpt_missing", ",".join(gone)[:5000])


def wall_clock(started: float, tokens: int) -> dict[str, float]:
    """`loop_wall_s`: seconds since `started` (perf_counter), everything the loop did included; `wall_tokens_per_s`:
    `tokens` (trained since then, summed over workers or pack members) over them."""
    wall = time.perf_counter() - started
    return {"loop_wall_s": wall, "wall_tokens_per_s": tokens / max(wall, 1e-9)}


class LineWriter:
    """File-like that turns tqdm's carriage-return redraws into whole lines."""

    def __init__(self, stream: Any):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def all_reduce_sum(tensor: torch.Tensor, world_size: int) -> torch.Tensor:
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
        metrics = benchmarks.classification_metrics(all_reduce_sum(confusion.to(device), world_size).cpu())
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
        metrics = benchmarks.language_model_metrics(*all_reduce_sum(sums.to(device), world_size).cpu().tolist())
    return {f"eval_{k}": v for k, v in metrics.items()}


def nonfinite_ranks(loss: torch.Tensor, rank: int, world_size: int) -> list[int]:
    """Ranks whose loss is NaN/Inf at this step, known to every rank so all stop at the same step."""
    flags = torch.zeros(world_size, device=loss.device)
    flags[rank] = 0.0 if torch.isfinite(loss.detach()).all() else 1.0
    return [r for r, bad in enumerate(all_reduce_sum(flags, world_size).tolist()) if bad]


def restore(checkpoint: Any) -> tuple[Path, dict[str, Any], list[str]]:
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


def write_checkpoint(directory: Path, strategy: MemoryStrategy, rank: int, metadata: dict[str, Any]) -> None:
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


def tag_node(mlflow_client: Any, run_id: str) -> None:
    """Which Ray node runs rank 0 now (`loraforge.node_id`), and every node it ran on (`loraforge.node_ids`)."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    earlier = mlflow_client.get_run(run_id).data.tags.get("loraforge.node_ids", "")
    nodes = [n for n in earlier.split(",") if n]
    if not nodes or nodes[-1] != node:
        nodes.append(node)
    tracking.set_tags(mlflow_client, run_id, {"loraforge.node_id": node, "loraforge.node_ids": ",".join(nodes)})
