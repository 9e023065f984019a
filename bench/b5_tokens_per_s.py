"""B5: orchestration tax on tokens/s = our Ray Train trial (1 worker, MLflow on) ÷ a bare PEFT loop.

Same model (MiniLM), data (SST-2 rows), sequence length, batch size, batches and threads (1), and the
same work around the steps: an evaluation on the eval rows and a checkpoint (adapter + optimizer
state) every `--eval-every` steps and at the end. Both clocks span the first batch to the last
checkpoint written: the bare loop's in this process; the trial's is its worker's `loop_wall_s`, which
also holds its MLflow logging and flushes and every earlier report to Tune (the last report's
upload is the one thing after it). The steps-only figures (over `train_time_s`, all that B5
timed up to ab23a2b) are printed beside them. The arms alternate, `--rounds` times; medians and spread.

    python bench/b5_tokens_per_s.py [--steps 150] [--eval-every 25] [--rounds 3]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _common import bare_peft_loop, dump, experiment, median, spread

from pipeline.config import load_config
from pipeline.run import run_pipeline


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    import yaml

    runs: dict[str, list[dict]] = {"bare": [], "ours": []}
    for round_ in range(args.rounds):
        for arm in (("bare", "ours") if round_ % 2 == 0 else ("ours", "bare")):
            with tempfile.TemporaryDirectory() as tmp_dir:
                tmp = Path(tmp_dir)
                raw = experiment(tmp, train_rows=args.steps * 32, eval_rows=64, steps_between_evals=args.eval_every,
                                 name=f"b5-{round_}")
                raw["eval"] = {"suites": []}  # the benchmark stage after the sweep is outside both clocks anyway
                (tmp / "c.yaml").write_text(yaml.safe_dump(raw))
                config = load_config(tmp / "c.yaml", env={})
                if arm == "bare":
                    (tmp / "ckpt").mkdir()
                    runs["bare"].append(bare_peft_loop(config, args.steps, checkpoint_dir=tmp / "ckpt"))
                else:
                    last = run_pipeline(config).sweep.best.last_result
                    runs["ours"].append({"tokens_per_s": last["wall_tokens_per_s"], "seconds": last["loop_wall_s"],
                                         "train_tokens_per_s": last["tokens_per_s"], "train_seconds": last["train_time_s"],
                                         "eval_seconds": last["eval_time_s"]})
    wall = {arm: [r["tokens_per_s"] for r in rows] for arm, rows in runs.items()}
    steps_only = {arm: [r["train_tokens_per_s"] for r in rows] for arm, rows in runs.items()}
    ratio = median(wall["ours"]) / median(wall["bare"])
    ratio_steps = median(steps_only["ours"]) / median(steps_only["bare"])
    print(f"\nB5 tokens/s, MiniLM + LoRA r=8 q,v, batch 32, 1 thread, {args.steps} steps, an evaluation (64 rows) and a "
          f"checkpoint every {args.eval_every} steps, {args.rounds} alternating rounds")
    print("  first batch to last checkpoint (evaluations, checkpoints, tracking and reports included):")
    print(f"    bare PEFT loop  : {spread(wall['bare'], '.0f')} tokens/s")
    print(f"    loraforge trial : {spread(wall['ours'], '.0f')} tokens/s (Ray Train worker, MLflow step logging)")
    print(f"    ratio ours / bare: {ratio:.3f}   (target >= 0.95)")
    print("  the training steps alone (what B5 timed before):")
    print(f"    bare {spread(steps_only['bare'], '.0f')}, ours {spread(steps_only['ours'], '.0f')} tokens/s, "
          f"ratio {ratio_steps:.3f}")
    dump("b5", {"steps": args.steps, "eval_every": args.eval_every, "rounds": args.rounds, "runs": runs,
                "ratio_wall": ratio, "ratio_steps_only": ratio_steps})


if __name__ == "__main__":
    main()
