"""Memory strategies side by side, in one run: trainable parameters, base bytes per parameter,
peak process memory and step time, each measured in its own fresh child process.

Part A (a causal LM built from a Llama config, ~107M parameters, saved and loaded with
`from_pretrained`): base bytes per parameter and peak RSS of a bf16 base vs the same base
in NF4 + double quantization. Target: QLoRA base <= 0.3x the bf16 base's bytes.
On a GPU (when one is there) it also records torch.cuda.max_memory_allocated.

Part B (MiniLM + SST-2 rows, LoRA r=8 on query/value, batch 16, 1 thread per process):
step time of plain LoRA, QLoRA and ZeRO-3 + CPU offload (1 and 2 processes) through
`pipeline.strategies`, as ratios to plain LoRA. Prints tables; asserts nothing.

    python bench/b6_memory_strategies.py [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import dump, experiment, median
from _memory import base_bytes, causal_config, load_frozen_base, peak_rss_mib, rss_now_mib

MEASURED = ("peak_rss_mib", "rss_before_load_mib", "rss_after_load_mib", "rss_added_by_load_mib")
CAUSAL = dict(vocab_size=2000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
              num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=256)


# ------------------------------------------------------------------------------------------- children


def child_causal(kind: str, model_dir: str) -> dict:
    import torch

    torch.set_num_threads(1)
    config = causal_config(model_dir, "b6")
    before, before_now = peak_rss_mib(), rss_now_mib()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_frozen_base(config, kind, device)
    out = base_bytes(model)
    after = rss_now_mib()
    # measured: what loading the base added to the process's resident memory (the interpreter, torch and
    # transformers were already there), and the peak over the load
    out.update(peak_rss_mib=peak_rss_mib(), peak_rss_before_load_mib=before, rss_before_load_mib=before_now,
               rss_after_load_mib=after, rss_added_by_load_mib=after - before_now)
    if device.type == "cuda":
        out["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def child_train(raw_config: str, rank: int, world: int, steps: int) -> dict:
    import torch

    from pipeline import adapters, data
    from pipeline.config import ExperimentConfig
    from pipeline.strategies import Worker, strategy_for

    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = ExperimentConfig.model_validate(json.loads(raw_config))
    strategy = strategy_for(config, Worker(rank=rank, world_size=world))
    model = strategy.load_model()
    trainable = adapters.trainable_parameters(model)
    wrapped, _ = strategy.wrap(model)
    bytes_info = base_bytes(model)
    tokenizer = adapters.load_tokenizer(config.model, config.data)
    examples = data.tokenize_rows(config.data, data.load_split(config.data, "train"), tokenizer)
    batches = data.make_batches([len(e.input_ids) for e in examples], config.train.batch_size, shuffle=True,
                                seed=0, bucketing=True, rank=rank, world_size=world)
    times = []
    for i, indices in enumerate(batches[: steps + 3]):
        batch = data.collate([examples[j] for j in indices], tokenizer.pad_token_id)
        started = time.perf_counter()
        strategy.backward(wrapped(**batch).loss)
        strategy.step()
        if i >= 3:  # the first steps warm caches and allocators
            times.append(time.perf_counter() - started)
    return {"trainable_params": trainable, "step_s": sorted(times)[len(times) // 2], "peak_rss_mib": peak_rss_mib(),
            "rss_mib": rss_now_mib(),
            "base_bytes_per_param_this_worker": bytes_info["bytes_per_param"]}


def spawn(args: list[str], env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, "--child", *args], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def collect(proc: subprocess.Popen) -> dict:
    out, _ = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"child failed ({proc.returncode})")
    return json.loads(out.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of every arm (medians and spread)")
    parser.add_argument("--child", nargs="+")
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        result = child_causal(rest[0], rest[1]) if kind == "causal" else child_train(rest[0], int(rest[1]), int(rest[2]), int(rest[3]))
        print(json.dumps(result))
        return

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        # ---- Part A: the same causal model, bf16 vs NF4 + DQ
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**CAUSAL)).save_pretrained(tmp / "causal", safe_serialization=True)
        (tmp / "causal" / "tokenizer_config.json").write_text("{}")
        memory_runs: dict[str, list[dict]] = {"bf16": [], "nf4_dq": []}
        for round_ in range(args.rounds):
            for kind in (list(memory_runs) if round_ % 2 == 0 else list(reversed(memory_runs))):
                memory_runs[kind].append(collect(spawn(["causal", kind, str(tmp / "causal")])))
        # the tensor bytes are the same every round; the measured memory is the median over the rounds
        memory = {kind: {**rows[0], **{key: median([r[key] for r in rows]) for key in MEASURED}}
                  for kind, rows in memory_runs.items()}

        # ---- Part B: step time per strategy on MiniLM + SST-2
        raw = experiment(tmp, train_rows=16 * (args.steps + 3) * 2, eval_rows=8, steps_between_evals=10**6)
        raw["train"]["batch_size"] = 16
        arms = (("lora", {"kind": "lora"}, 1), ("qlora (nf4+dq, fp32 compute)",
                {"kind": "qlora", "compute_dtype": "float32"}, 1),
                ("qlora (nf4+dq, bf16 compute)", {"kind": "qlora"}, 1),
                ("zero3_offload x1", {"kind": "zero3_offload"}, 1),
                ("zero3_offload x2", {"kind": "zero3_offload"}, 2))
        step_runs: dict[str, list[dict]] = {label: [] for label, _, _ in arms}
        for round_ in range(args.rounds):
            for label, strategy, world in (arms if round_ % 2 == 0 else tuple(reversed(arms))):
                config = json.dumps({**raw, "strategy": strategy})
                port = str(free_port())
                procs = [spawn(["train", config, str(rank), str(world), str(args.steps)],
                               {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}) for rank in range(world)]
                results = [collect(p) for p in procs]
                step_runs[label].append({**results[0], "world": world,
                                         "rss_mib_all_workers": sum(r["rss_mib"] for r in results),
                                         "peak_rss_mib_all_workers": sum(r["peak_rss_mib"] for r in results)})
        runs = {label: {**rows[0], "step_s_runs": [r["step_s"] for r in rows],
                        **{key: median([r[key] for r in rows]) for key in ("step_s", "rss_mib_all_workers",
                                                                          "peak_rss_mib_all_workers")}}
                for label, rows in step_runs.items()}

    bf16, nf4 = memory["bf16"], memory["nf4_dq"]
    params = bf16["base_params"]
    print(f"\nB6 part A: causal LM ({params / 1e6:.0f}M parameters), frozen base in bf16 vs NF4 + double quantization, "
          f"{args.rounds} alternating rounds (medians)")
    print("  measured (process RSS, MiB):")
    print(f"    {'base':<10} {'added by the load':>18} {'RSS after load':>15} {'peak RSS':>9}")
    for label, kind in (("bf16", "bf16"), ("nf4+dq", "nf4_dq")):
        added = [r["rss_added_by_load_mib"] for r in memory_runs[kind]]
        print(f"    {label:<10} {memory[kind]['rss_added_by_load_mib']:>18.0f} {memory[kind]['rss_after_load_mib']:>15.0f} "
              f"{memory[kind]['peak_rss_mib']:>9.0f}   (added: {', '.join(f'{a:.0f}' for a in added)})")
    measured_ratio = nf4["rss_added_by_load_mib"] / bf16["rss_added_by_load_mib"]
    print(f"    measured: RSS the NF4+DQ load added / RSS the bf16 load added: {measured_ratio:.3f}; "
          f"whole-process RSS after load: {nf4['rss_after_load_mib'] / bf16['rss_after_load_mib']:.3f}")
    print("    (the peak is the load: transformers reads the full-precision weights before quantizing them)")
    print("  arithmetic (the weights' tensor bytes, quantization constants included; not a measurement of memory):")
    print(f"    {'base':<10} {'bytes/param':>12} {'linear bytes/param':>19} {'base MiB':>9}")
    for label, row in (("bf16", bf16), ("nf4+dq", nf4)):
        print(f"    {label:<10} {row['bytes_per_param']:>12.3f} {row['linear_bytes_per_param']:>19.3f} {row['base_mib']:>9.1f}")
    ratio = nf4["base_mib"] / bf16["base_mib"]
    print(f"    QLoRA base bytes / bf16 base bytes: {ratio:.3f}   (target <= 0.3); linear layers only: "
          f"{nf4['linear_bytes_per_param'] / bf16['linear_bytes_per_param']:.3f}")
    if "cuda_max_allocated_mib" in bf16:
        print(f"  torch.cuda.max_memory_allocated: bf16 {bf16['cuda_max_allocated_mib']:.0f} MiB, "
              f"nf4+dq {nf4['cuda_max_allocated_mib']:.0f} MiB")
    else:
        print("  (no GPU here: torch.cuda.max_memory_allocated not measured)")

    base_step = runs["lora"]["step_s"]
    print(f"\nB6 part B: MiniLM + SST-2, LoRA r=8 on query/value, batch 16 per process, 1 thread each; step time: the "
          f"median of {args.steps} steps in each run, then the median over {args.rounds} alternating runs (spread in the last column)")
    print(f"  {'strategy':<30} {'procs':>5} {'trainable':>10} {'base B/param/worker':>20} {'step s':>7} {'vs lora':>8} {'RSS MiB (all)':>14}")
    for label, row in runs.items():
        print(f"  {label:<30} {row['world']:>5} {row['trainable_params']:>10} {row['base_bytes_per_param_this_worker']:>20.3f} "
              f"{row['step_s']:>7.3f} {row['step_s'] / base_step:>8.2f} {row['rss_mib_all_workers']:>14.0f}   "
              f"{min(row['step_s_runs']):.3f}-{max(row['step_s_runs']):.3f}")
    dump("b6", {"rounds": args.rounds, "memory": memory, "memory_runs": memory_runs, "runs": runs, "step_runs": step_runs,
                "nf4_over_bf16_tensor_bytes": ratio, "nf4_over_bf16_rss_added_by_load": measured_ratio})


if __name__ == "__main__":
    main()
