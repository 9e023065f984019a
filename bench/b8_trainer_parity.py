"""B8: quality and speed parity with `transformers.Trainer` + PEFT, the same config and seed.

The same MiniLM classification experiment (SST-2 rows, LoRA r=8 on query/value with the classifier and
pooler trained in full, AdamW, linear schedule with 6% warmup, weight decay 0.01, clipping at 1.0, batch
32, 1 thread) trained twice per seed, in alternating order:
- **ours**: `loraforge run` (one Ray Train trial, MLflow on): the loss curve is its `train_loss` history,
  the accuracy its last evaluation, tokens/s its `wall_tokens_per_s` (first batch to last checkpoint);
- **Trainer**: `transformers.Trainer` + PEFT in a fresh process on the same tokenized rows (the
  product's tokenization), length-grouped batches (`train_sampling_strategy="group_by_length"`, as ours
  buckets by length), evaluating and saving at the same steps; tokens/s is the real tokens over
  `train_runtime`, which spans its whole loop, evaluations and saves included.
Prints per-seed accuracies, the mean accuracy difference (gate: within 0.5 pt), the loss curves
side by side (medians over the seeds; also `bench/results/b8_loss.png`) and the tokens/s ratio.

    python bench/b8_trainer_parity.py [--seeds 0 1 2] [--train-rows 960] [--epochs 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import REPO, dump, experiment, median, spread


def trainer_child(raw: dict, out_dir: str) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments)

    from pipeline import data
    from pipeline.config import ExperimentConfig

    config = ExperimentConfig.model_validate(raw)
    train, lora = config.train, config.lora
    torch.set_num_threads(train.cpus_per_worker)
    path = config.model.resolve()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=config.data.num_labels)
    model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                             target_modules=list(lora.target_modules),
                                             modules_to_save=["classifier", "pooler"], task_type="SEQ_CLS"))

    def rows(split: str) -> list[dict]:
        examples = data.tokenize_rows(config.data, data.load_split(config.data, split, train.seed), tokenizer)
        return [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]

    train_rows, eval_rows = rows("train"), rows("eval")

    def accuracy(prediction) -> dict:
        return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}

    args = TrainingArguments(
        output_dir=out_dir, seed=train.seed, data_seed=train.seed, learning_rate=train.lr, num_train_epochs=train.epochs,
        per_device_train_batch_size=train.batch_size, per_device_eval_batch_size=config.eval.batch_size,
        weight_decay=train.weight_decay, warmup_steps=train.warmup_ratio, lr_scheduler_type=train.lr_scheduler,
        max_grad_norm=train.max_grad_norm, logging_steps=train.log_every_steps, eval_strategy="steps",
        eval_steps=train.eval_every_steps, save_strategy="steps", save_steps=train.eval_every_steps,
        train_sampling_strategy="group_by_length", report_to="none", use_cpu=True, dataloader_num_workers=0,
        disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=train_rows, eval_dataset=eval_rows,
                      data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=accuracy)
    output = trainer.train()
    history = trainer.state.log_history
    tokens = sum(len(r["input_ids"]) for r in train_rows) * train.epochs
    return {"accuracy": [h["eval_accuracy"] for h in history if "eval_accuracy" in h][-1],
            "loss_curve": [[h["step"], h["loss"]] for h in history if "loss" in h],
            "eval_curve": [[h["step"], h["eval_accuracy"]] for h in history if "eval_accuracy" in h],
            "seconds": output.metrics["train_runtime"], "tokens_per_s": tokens / output.metrics["train_runtime"]}


def ours(raw: dict, tmp: Path) -> dict:
    import yaml

    from pipeline import tracking
    from pipeline.config import load_config
    from pipeline.run import run_pipeline

    (tmp / "c.yaml").write_text(yaml.safe_dump(raw))
    config = load_config(tmp / "c.yaml", env={})
    result = run_pipeline(config)
    best = result.sweep.best
    client = tracking.client(config.tracking.tracking_uri)
    curve = lambda key: sorted([m.step, m.value] for m in client.get_metric_history(best.run_id, key))  # noqa: E731
    last = best.last_result
    return {"accuracy": last["eval_accuracy"], "loss_curve": curve("train_loss"), "eval_curve": curve("eval_accuracy"),
            "seconds": last["loop_wall_s"], "tokens_per_s": last["wall_tokens_per_s"]}


def plot(curves: dict[str, dict[int, float]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for arm, points in curves.items():
        steps = sorted(points)
        ax.plot(steps, [points[s] for s in steps], marker="o", markersize=3, label=arm)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("train loss (median over seeds)")
    ax.set_title("B8: loraforge vs transformers.Trainer + PEFT")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def median_curve(runs: list[dict]) -> dict[int, float]:
    by_step: dict[int, list[float]] = {}
    for run in runs:
        for step, value in run["loss_curve"]:
            by_step.setdefault(int(step), []).append(value)
    return {step: statistics.median(values) for step, values in by_step.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train-rows", type=int, default=960)
    parser.add_argument("--eval-rows", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--child", nargs=2)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(trainer_child(json.loads(Path(args.child[0]).read_text()), args.child[1])))
        return

    runs: dict[str, list[dict]] = {"ours": [], "trainer": []}
    for i, seed in enumerate(args.seeds):
        for arm in (("ours", "trainer") if i % 2 == 0 else ("trainer", "ours")):
            with tempfile.TemporaryDirectory() as tmp_dir:
                tmp = Path(tmp_dir)
                raw = experiment(tmp, train_rows=args.train_rows, eval_rows=args.eval_rows, steps_between_evals=10,
                                 epochs=args.epochs, name=f"b8-{seed}")
                raw["train"].update(seed=seed, log_every_steps=5)
                raw["eval"] = {"suites": []}
                if arm == "ours":
                    runs["ours"].append(ours(raw, tmp))
                else:
                    (tmp / "raw.json").write_text(json.dumps(raw))
                    out = subprocess.run([sys.executable, __file__, "--child", str(tmp / "raw.json"), str(tmp / "out")],
                                         capture_output=True, text=True)
                    if out.returncode:
                        raise SystemExit(f"Trainer child failed:\n{out.stderr[-3000:]}")
                    runs["trainer"].append(json.loads(out.stdout.strip().splitlines()[-1]))

    accuracy = {arm: [r["accuracy"] for r in rows] for arm, rows in runs.items()}
    deltas = [a - b for a, b in zip(accuracy["ours"], accuracy["trainer"])]
    mean_delta = statistics.mean(deltas)
    speed = {arm: [r["tokens_per_s"] for r in rows] for arm, rows in runs.items()}
    ratio = median(speed["ours"]) / median(speed["trainer"])
    steps = args.train_rows // 32 * args.epochs
    print(f"\nB8 parity with transformers.Trainer + PEFT: MiniLM, SST-2 {args.train_rows} train / {args.eval_rows} eval rows, "
          f"LoRA r=8 q,v, batch 32, {args.epochs} epochs ({steps} steps), 1 thread, seeds {args.seeds}")
    print(f"  {'seed':>4} {'ours acc':>9} {'Trainer acc':>12} {'diff (pt)':>10}")
    for seed, a, b in zip(args.seeds, accuracy["ours"], accuracy["trainer"]):
        print(f"  {seed:>4} {a:>9.4f} {b:>12.4f} {100 * (a - b):>10.2f}")
    print(f"  mean difference {100 * mean_delta:+.2f} pt (gate: within 0.5 pt); seed spread: ours "
          f"{100 * (max(accuracy['ours']) - min(accuracy['ours'])):.2f} pt, Trainer "
          f"{100 * (max(accuracy['trainer']) - min(accuracy['trainer'])):.2f} pt")
    curves = {"loraforge": median_curve(runs["ours"]), "transformers.Trainer": median_curve(runs["trainer"])}
    print("  train loss (median over seeds):")
    print(f"    {'step':>5} {'ours':>8} {'Trainer':>8}")
    for step in sorted(set(curves["loraforge"]) | set(curves["transformers.Trainer"])):
        a, b = curves["loraforge"].get(step), curves["transformers.Trainer"].get(step)
        print(f"    {step:>5} {a if a is not None else float('nan'):>8.4f} {b if b is not None else float('nan'):>8.4f}")
    print(f"  tokens/s (whole loop, evaluations and checkpoints included): ours {spread(speed['ours'], '.0f')}, "
          f"Trainer {spread(speed['trainer'], '.0f')}; ratio ours / Trainer {ratio:.3f}")
    out = REPO / "bench" / "results"
    out.mkdir(exist_ok=True)
    plot(curves, out / "b8_loss.png")
    dump("b8", {"seeds": args.seeds, "train_rows": args.train_rows, "eval_rows": args.eval_rows, "epochs": args.epochs,
                "runs": runs, "accuracy_diff_mean": mean_delta, "tokens_per_s_ratio": ratio})


if __name__ == "__main__":
    main()
