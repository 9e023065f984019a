"""B16, routing: with the base and 8 adapters loaded once, route each batch to its adapter by repeating
it per adapter (`set_adapter`, one adapter after another: what one-load evaluation does) or by mixing
rows of all adapters in one batch (PEFT's `adapter_names=`, the batch repeated once per adapter).

The same loaded SmolLM2 model and the same 8 adapters as `b16_one_load.py` (mixed ranks and targets),
the same inputs: per-row NLL of 64 Code Alpaca rows (batches of 8 rows; mixed: 8 x 8 = 64 rows a
forward) and 32 greedy tokens on 16 identity prompts (one batch of 16; mixed: 128 rows a generate).
Arms alternate, `--rounds` times; medians and spread; checks the two routings give the same NLLs
(1e-5) and texts. Asserts nothing.

    python bench/b16_routing.py [--rounds 3] [--rows 64] [--prompts 16] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from _common import dump, median, spread
from b16_one_load import ADAPTERS, configs, make_adapters

from pipeline.eval.generation import new_text


def row_nll(logits, labels):
    import torch

    from pipeline import data

    losses = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, 1:],
                                               ignore_index=data.IGNORE_INDEX, reduction="none")
    return [float(row.sum()) for row in losses]


def perplexity(model, batches, names, mixed: bool) -> dict:
    import torch

    nll: dict[str, list[float]] = {name: [] for name in names}
    with torch.no_grad():
        if mixed:
            for batch in batches:
                rows = len(batch["input_ids"])
                big = {k: v.repeat(len(names), 1) for k, v in batch.items()}
                logits = model(input_ids=big["input_ids"], attention_mask=big["attention_mask"],
                               adapter_names=[n for n in names for _ in range(rows)]).logits
                values = row_nll(logits, big["labels"])
                for i, name in enumerate(names):
                    nll[name] += values[i * rows:(i + 1) * rows]
        else:
            for name in names:
                model.set_adapter(name)
                for batch in batches:
                    nll[name] += row_nll(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                         batch["labels"])
    return nll


def generate(model, tokenizer, batch, names, mixed: bool, new_tokens: int) -> dict:
    import torch

    kwargs = {"max_new_tokens": new_tokens, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    width = batch["input_ids"].shape[1]
    texts: dict[str, list[str]] = {}
    with torch.no_grad():
        if mixed:
            rows = len(batch["input_ids"])
            big = {k: v.repeat(len(names), 1) for k, v in batch.items()}
            out = model.generate(**big, adapter_names=[n for n in names for _ in range(rows)], **kwargs)
            for i, name in enumerate(names):
                texts[name] = [new_text(tokenizer, r)[1] for r in out[i * rows:(i + 1) * rows, width:]]
        else:
            for name in names:
                model.set_adapter(name)
                out = model.generate(**batch, **kwargs)
                texts[name] = [new_text(tokenizer, r)[1] for r in out[:, width:]]
    return texts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    import torch

    from pipeline import data
    from pipeline.datafiles import require
    from pipeline.eval import stage
    from pipeline.eval.generation import left_pad

    torch.set_num_threads(2)
    times: dict[str, dict[str, list[float]]] = {"repeat": {"perplexity": [], "generate": []},
                                                "mixed": {"perplexity": [], "generate": []}}
    agree = {"perplexity": True, "generate": True}
    with tempfile.TemporaryDirectory(prefix="b16r-") as tmp:
        ppl, _ = configs(Path(tmp), args.rows, args.prompts, args.new_tokens)
        refs = make_adapters(ppl, Path(tmp) / "adapters")
        model, tokenizer, names = stage.load_models(ppl, refs, Path(tmp) / "work")
        examples = data.tokenize_rows(ppl.data, data.load_split(ppl.data, "eval"), tokenizer)
        order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
        batches = [data.collate([examples[i] for i in order[s:s + 8]], tokenizer.pad_token_id)
                   for s in range(0, len(order), 8)]
        conversations = json.loads(require("sharegpt_identity/dummy_conversation.json").read_text())[:args.prompts]
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": c["conversations"][0]["value"]}],
                                                 add_generation_prompt=True, tokenize=True) for c in conversations]
        prompts = [p["input_ids"] if isinstance(p, dict) or hasattr(p, "keys") else p for p in prompts]
        prompt_batch = left_pad(prompts, tokenizer.pad_token_id)
        for round_ in range(args.rounds):
            outs = {}
            for arm in (("repeat", "mixed") if round_ % 2 == 0 else ("mixed", "repeat")):
                began = time.perf_counter()
                nll = perplexity(model, batches, names, arm == "mixed")
                times[arm]["perplexity"].append(time.perf_counter() - began)
                began = time.perf_counter()
                texts = generate(model, tokenizer, prompt_batch, names, arm == "mixed", args.new_tokens)
                times[arm]["generate"].append(time.perf_counter() - began)
                outs[arm] = (nll, texts)
            agree["perplexity"] &= all(abs(a - b) <= 1e-5 * max(1.0, abs(a)) for name in names
                                       for a, b in zip(outs["repeat"][0][name], outs["mixed"][0][name]))
            agree["generate"] &= outs["repeat"][1] == outs["mixed"][1]

    print(f"\nB16 routing on one load: {len(ADAPTERS)} SmolLM2 adapters, NLL of {args.rows} rows (batches of 8) and "
          f"{args.new_tokens} greedy tokens on {args.prompts} prompts, {args.rounds} alternating rounds, 2 threads")
    for part in ("perplexity", "generate"):
        ratio = median(times["mixed"][part]) / median(times["repeat"][part])
        print(f"  {part:10s} repeat per adapter {spread(times['repeat'][part])} s; mixed rows {spread(times['mixed'][part])} s;"
              f" mixed / repeat {ratio:.3f}; same outputs: {agree[part]}")
    total = {arm: [p + g for p, g in zip(times[arm]["perplexity"], times[arm]["generate"])] for arm in times}
    print(f"  both       mixed / repeat {median(total['mixed']) / median(total['repeat']):.3f}")
    dump("b16_routing", {"args": vars(args), "seconds": times, "outputs_agree": agree,
                         "ratio_mixed_over_repeat": {part: median(times["mixed"][part]) / median(times["repeat"][part])
                                                     for part in ("perplexity", "generate")}})


if __name__ == "__main__":
    main()
