"""B4: base-weight memory of a frozen base in bf16, NF4, and NF4 + double quantization (QLoRA's DQ).

A random-init Llama-style model (hidden 768, 8 layers, vocab 32k: about 110M parameters), saved once
and loaded by each arm in its own fresh child process through the product's own loader
(`pipeline.strategies.load_quantized_base`, bitsandbytes), `--rounds` alternating rounds:

- arithmetic: the weights' exact tensor bytes, quantization constants included (absmax, the second
  level's absmax and code book), for the whole base and for the quantized linear layers, against the
  theory for linear weights (bf16 16 bits; NF4 4 + 32/64 = 4.5 bits; NF4+DQ 4 + 8/64 + 32/(64*256) =
  4.127 bits per parameter). Gate: measured linear-weight bytes within 2% of theory.
- measured: the process RSS the load added, the peak RSS (ru_maxrss) over the load, the peak RSS
  during one LoRA step (r=8 on q,v; seq 128, batch 4; AdamW), sampled every 5 ms, and the RSS after
  that step (each relative to the RSS before the load); on a GPU also
  `torch.cuda.max_memory_allocated` after the load and after the step.

Prints the ratios bf16 / NF4+DQ and NF4 / NF4+DQ; asserts nothing.

    python bench/b4_double_quant.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _common import dump, median
from _memory import base_bytes, causal_config, load_frozen_base, peak_rss_mib, resident_mib, rss_now_mib

SHAPE = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12,
             num_key_value_heads=12, max_position_embeddings=512)
ARMS = ("bf16", "nf4", "nf4_dq")
THEORY_BITS = {"bf16": 16.0, "nf4": 4 + 32 / 64, "nf4_dq": 4 + 8 / 64 + 32 / (64 * 256)}


class RssSampler:
    """The largest current RSS seen while it runs (a step's peak, which ru_maxrss hides under the load's)."""

    def __init__(self, every_s: float = 0.005):
        self.every_s, self.peak, self._stop = every_s, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, resident_mib())
            time.sleep(self.every_s)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def child(kind: str, model_dir: str) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = causal_config(model_dir, "b4")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    before = rss_now_mib()
    model = load_frozen_base(config, kind, device)
    out = base_bytes(model)
    out.update(rss_before_load_mib=before, rss_added_by_load_mib=rss_now_mib() - before, peak_rss_load_mib=peak_rss_mib())
    if device.type == "cuda":
        out["cuda_max_allocated_load_mib"] = torch.cuda.max_memory_allocated() / 2**20
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    input_ids = torch.randint(0, SHAPE["vocab_size"], (4, 128), device=device)
    with RssSampler() as sampler:
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
    out.update(peak_rss_step_mib=sampler.peak, step_added_mib=sampler.peak - before, loss=float(loss.detach()),
               rss_after_step_added_mib=rss_now_mib() - before)
    if device.type == "cuda":
        out["cuda_max_allocated_step_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", nargs=2)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    runs: dict[str, list[dict]] = {kind: [] for kind in ARMS}
    with tempfile.TemporaryDirectory() as tmp_dir:
        model_dir = Path(tmp_dir) / "llama"
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**SHAPE)).to(torch.bfloat16).save_pretrained(model_dir, safe_serialization=True)
        (model_dir / "tokenizer_config.json").write_text("{}")
        for round_ in range(args.rounds):
            for kind in (ARMS if round_ % 2 == 0 else tuple(reversed(ARMS))):
                out = subprocess.run([sys.executable, __file__, "--child", kind, str(model_dir)], capture_output=True,
                                     text=True)
                if out.returncode:
                    raise SystemExit(f"{kind} child failed:\n{out.stderr[-3000:]}")
                runs[kind].append(json.loads(out.stdout.strip().splitlines()[-1]))

    measured = ("rss_added_by_load_mib", "peak_rss_load_mib", "step_added_mib", "peak_rss_step_mib", "rss_after_step_added_mib",
                "cuda_max_allocated_load_mib", "cuda_max_allocated_step_mib")
    figures = {kind: {**rows[0], **{k: median([r[k] for r in rows]) for k in measured if k in rows[0]}}
               for kind, rows in runs.items()}
    params = figures["bf16"]["base_params"]
    print(f"\nB4 base-weight memory, random-init Llama ({params / 1e6:.0f}M parameters; hidden 768, 8 layers, vocab 32k), "
          f"{args.rounds} alternating rounds, each arm in a fresh process")
    print("  arithmetic (tensor bytes of the weights, quantization constants included):")
    print(f"    {'base':<8} {'linear bits/param':>18} {'theory':>7} {'off theory':>10} {'whole base MiB':>15}")
    gate = {}
    for kind in ARMS:
        row = figures[kind]
        bits = row["linear_bytes_per_param"] * 8
        gate[kind] = abs(bits / THEORY_BITS[kind] - 1)
        print(f"    {kind:<8} {bits:>18.3f} {THEORY_BITS[kind]:>7.3f} {gate[kind]:>9.2%} {row['base_mib']:>15.1f}")
    linear = {kind: figures[kind]["linear_bytes_per_param"] for kind in ARMS}
    print(f"    linear weights: bf16 / NF4+DQ {linear['bf16'] / linear['nf4_dq']:.3f} (theory 3.877), NF4 / NF4+DQ "
          f"{linear['nf4'] / linear['nf4_dq']:.3f} (theory 1.090); gate (within 2% of theory): "
          f"{'met' if max(gate.values()) <= 0.02 else 'NOT met'}")
    print(f"    whole base (embeddings and lm_head stay bf16): bf16 / NF4+DQ "
          f"{figures['bf16']['base_mib'] / figures['nf4_dq']['base_mib']:.3f}, NF4 / NF4+DQ "
          f"{figures['nf4']['base_mib'] / figures['nf4_dq']['base_mib']:.3f}")
    print("  measured (process RSS, MiB; medians):")
    print(f"    {'base':<8} {'added by load':>14} {'peak over load':>15} {'step peak, added':>17} {'after step, added':>18}")
    for kind in ARMS:
        row = figures[kind]
        added = ", ".join(f"{r['rss_after_step_added_mib']:.0f}" for r in runs[kind])
        print(f"    {kind:<8} {row['rss_added_by_load_mib']:>14.0f} {row['peak_rss_load_mib']:>15.0f} "
              f"{row['step_added_mib']:>17.0f} {row['rss_after_step_added_mib']:>18.0f}   (after step, each round: {added})")
    print("    (a bf16 base loaded from a bf16 safetensors file stays mapped from the file until a forward touches it,")
    print("     so its 'added by load' is near 0; 'after step' and 'step peak' count every weight. On a CPU,")
    print("     bitsandbytes dequantizes each 4-bit weight for every matmul, in the forward and again in the backward)")
    for key, label in (("rss_after_step_added_mib", "RSS after one step"), ("step_added_mib", "one-step peak")):
        print(f"    {label}: bf16 / NF4+DQ {figures['bf16'][key] / figures['nf4_dq'][key]:.3f}, "
              f"NF4 / NF4+DQ {figures['nf4'][key] / figures['nf4_dq'][key]:.3f}")
    if "cuda_max_allocated_load_mib" in figures["bf16"]:
        for kind in ARMS:
            print(f"    {kind:<8} torch.cuda.max_memory_allocated: load {figures[kind]['cuda_max_allocated_load_mib']:.0f} "
                  f"MiB, one step {figures[kind]['cuda_max_allocated_step_mib']:.0f} MiB")
    else:
        print("    (no GPU here: torch.cuda.max_memory_allocated not measured)")
    dump("b4", {"shape": SHAPE, "rounds": args.rounds, "theory_bits": THEORY_BITS, "figures": figures, "runs": runs,
                "linear_off_theory": gate})


if __name__ == "__main__":
    main()
