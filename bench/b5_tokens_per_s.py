"""B5: orchestration tax on tokens/s = our Ray Train trial (1 worker, MLflow on) ÷ a bare PEFT loop.

Same model (MiniLM), data (SST-2 rows), sequence length, batch size, batches and threads (1),
run one after the other in this process tree. Prints the ratio; asserts nothing.

    python bench/b5_tokens_per_s.py [--steps 150]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _common import bare_peft_loop, dump, experiment

from pipeline.config import load_config
from pipeline.run import run_pipeline


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args()
    import yaml

    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        raw = experiment(tmp, train_rows=args.steps * 32, eval_rows=64, steps_between_evals=args.steps, name="b5")
        (tmp / "c.yaml").write_text(yaml.safe_dump(raw))
        config = load_config(tmp / "c.yaml", env={})
        bare = bare_peft_loop(config, args.steps)
        result = run_pipeline(config)
        ours = result.sweep.best.last_result
    ratio = ours["tokens_per_s"] / bare["tokens_per_s"]
    print(f"\nB5 tokens/s, MiniLM + LoRA r=8 q,v, batch 32, 1 thread, {args.steps} steps")
    print(f"  bare PEFT loop      : {bare['tokens_per_s']:8.0f} tokens/s")
    print(f"  loraforge trial     : {ours['tokens_per_s']:8.0f} tokens/s (Ray Train worker, MLflow step logging)")
    print(f"  ratio ours / bare   : {ratio:.3f}   (target >= 0.95)")
    dump("b5", {"bare": bare, "ours_tokens_per_s": ours["tokens_per_s"], "ratio": ratio, "steps": args.steps})


if __name__ == "__main__":
    main()
