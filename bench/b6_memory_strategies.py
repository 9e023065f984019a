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
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, dump, experiment

CAUSAL = dict(vocab_size=2000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
              num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=256)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_now_mib() -> float:
    """Resident memory right now (after gc): steady state, unlike the peak, which loading dominates."""
    import gc

    gc.collect()
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def base_bytes(model) -> dict:
    """Bytes the frozen base's weights take, per logical parameter: all of it, and its linear layers only."""
    total_bytes = total_params = linear_bytes = linear_params = 0
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if "lora_" in module_name or "modules_to_save" in module_name:
                continue  # the adapters and the trained head copies are not the base
            state = getattr(param, "quant_state", None)
            nbytes = param.numel() * param.element_size()
            logical = param.numel()
            if hasattr(param, "ds_tensor"):  # ZeRO-3: this worker holds only its partition
                nbytes = param.ds_tensor.numel() * param.ds_tensor.element_size()
                logical = param.ds_numel
            elif state is not None:
                logical = int(torch_prod(state.shape))
                nbytes += state_bytes(state)
            total_bytes += nbytes
            total_params += logical
            # the transformer's linear layers (the output head stays unquantized under QLoRA)
            if type(module).__name__ in ("Linear", "Linear4bit") and name == "weight" and "lm_head" not in module_name:
                linear_bytes += nbytes
                linear_params += logical
    return {"bytes_per_param": total_bytes / total_params, "linear_bytes_per_param": linear_bytes / linear_params,
            "base_mib": total_bytes / 2**20, "base_params": total_params}


def torch_prod(shape) -> int:
    out = 1
    for dim in shape:
        out *= int(dim)
    return out


def state_bytes(state) -> int:
    """absmax (8-bit with DQ) + the second-level constants and code books of a bitsandbytes QuantState."""
    nbytes = state.absmax.numel() * state.absmax.element_size()
    if state.nested:
        nbytes += state.state2.absmax.numel() * state.state2.absmax.element_size()
        nbytes += state.state2.code.numel() * state.state2.code.element_size()
    return nbytes


# ------------------------------------------------------------------------------------------- children


def child_causal(kind: str, model_dir: str) -> dict:
    import torch

    from pipeline import adapters, strategies
    from pipeline.config import ExperimentConfig, QuantSpec
    from pipeline.datafiles import require

    torch.set_num_threads(1)
    config = ExperimentConfig.model_validate({
        "name": "b6", "model": {"name_or_path": model_dir},
        "data": {"kind": "data_to_text", "train_path": str(require("e2e/train.jsonl")),
                 "eval_path": str(require("e2e/dev.jsonl"))},
    })
    before = peak_rss_mib()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "bf16":
        model = adapters.load_base_model(config.model, config.data, dtype=torch.bfloat16).to(device)
    else:
        quant = QuantSpec(quant_type="nf4", double_quant=True, compute_dtype="bfloat16")
        model = strategies.load_quantized_base(config, quant, device, dtype=torch.bfloat16)
    out = base_bytes(model)
    out.update(peak_rss_mib=peak_rss_mib(), rss_before_load_mib=before, rss_after_load_mib=rss_now_mib())
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
        memory = {kind: collect(spawn(["causal", kind, str(tmp / "causal")])) for kind in ("bf16", "nf4_dq")}

        # ---- Part B: step time per strategy on MiniLM + SST-2
        raw = experiment(tmp, train_rows=16 * (args.steps + 3) * 2, eval_rows=8, steps_between_evals=10**6)
        raw["train"]["batch_size"] = 16
        runs = {}
        for label, strategy, world in (("lora", {"kind": "lora"}, 1), ("qlora (nf4+dq, fp32 compute)",
                                       {"kind": "qlora", "compute_dtype": "float32"}, 1),
                                       ("qlora (nf4+dq, bf16 compute)", {"kind": "qlora"}, 1),
                                       ("zero3_offload x1", {"kind": "zero3_offload"}, 1),
                                       ("zero3_offload x2", {"kind": "zero3_offload"}, 2)):
            config = json.dumps({**raw, "strategy": strategy})
            port = str(free_port())
            procs = [spawn(["train", config, str(rank), str(world), str(args.steps)],
                           {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}) for rank in range(world)]
            results = [collect(p) for p in procs]
            runs[label] = {**results[0], "world": world, "rss_mib_all_workers": sum(r["rss_mib"] for r in results),
                           "peak_rss_mib_all_workers": sum(r["peak_rss_mib"] for r in results)}

    bf16, nf4 = memory["bf16"], memory["nf4_dq"]
    params = bf16["base_params"]
    print(f"\nB6 part A: causal LM ({params / 1e6:.0f}M parameters), frozen base in bf16 vs NF4 + double quantization")
    print(f"  {'base':<10} {'bytes/param':>12} {'linear bytes/param':>19} {'base MiB':>9} {'RSS after load':>15} {'peak RSS MiB':>13}")
    for label, row in (("bf16", bf16), ("nf4+dq", nf4)):
        print(f"  {label:<10} {row['bytes_per_param']:>12.3f} {row['linear_bytes_per_param']:>19.3f} "
              f"{row['base_mib']:>9.1f} {row['rss_after_load_mib']:>15.0f} {row['peak_rss_mib']:>13.0f}")
    print("  (the peak is the load: transformers reads the full-precision weights before quantizing them)")
    ratio = nf4["base_mib"] / bf16["base_mib"]
    print(f"  QLoRA base bytes / bf16 base bytes: {ratio:.3f}   (target <= 0.3); linear layers only: "
          f"{nf4['linear_bytes_per_param'] / bf16['linear_bytes_per_param']:.3f}")
    if "cuda_max_allocated_mib" in bf16:
        print(f"  torch.cuda.max_memory_allocated: bf16 {bf16['cuda_max_allocated_mib']:.0f} MiB, "
              f"nf4+dq {nf4['cuda_max_allocated_mib']:.0f} MiB")
    else:
        print("  (no GPU here: torch.cuda.max_memory_allocated not measured)")

    base_step = runs["lora"]["step_s"]
    print(f"\nB6 part B: MiniLM + SST-2, LoRA r=8 on query/value, batch 16 per process, 1 thread each, median of {args.steps} steps")
    print(f"  {'strategy':<30} {'procs':>5} {'trainable':>10} {'base B/param/worker':>20} {'step s':>7} {'vs lora':>8} {'RSS MiB (all)':>14}")
    for label, row in runs.items():
        print(f"  {label:<30} {row['world']:>5} {row['trainable_params']:>10} {row['base_bytes_per_param_this_worker']:>20.3f} "
              f"{row['step_s']:>7.3f} {row['step_s'] / base_step:>8.2f} {row['rss_mib_all_workers']:>14.0f}")
    dump("b6", {"memory": memory, "runs": runs, "nf4_over_bf16": ratio})


if __name__ == "__main__":
    main()
