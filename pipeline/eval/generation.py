"""Batched generation for causal models: left-padded prompts, decoding settings from the config.

Works on the PEFT model as it is (no merge) or on a plain / merged model: both have
`generate`. Prompts are token ids built by `pipeline.data.prompt_ids`, the same the
adapter saw in training (the chat template when the tokenizer has one). Prompts are
sorted by length so a batch pads little, and the outputs come back in the input order.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from pipeline.config import GenerationSpec


@dataclass
class Generated:
    texts: list[str]
    new_tokens: int = 0  # tokens generated over all prompts (up to and including EOS)
    seconds: float = 0.0  # time inside model.generate
    per_item_tokens: list[int] = field(default_factory=list)


def generate_kwargs(spec: GenerationSpec, tokenizer: Any) -> dict[str, Any]:
    """`model.generate` keyword arguments for the decoding settings."""
    kwargs: dict[str, Any] = {
        "max_new_tokens": spec.max_new_tokens,
        "num_beams": spec.num_beams,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    sampling = spec.do_sample and spec.temperature > 0
    kwargs["do_sample"] = sampling
    if sampling:
        kwargs.update(temperature=spec.temperature, top_p=spec.top_p)
    else:  # the model's generation_config may carry sampling defaults; greedy/beam ignores them
        kwargs.update(temperature=None, top_p=None, top_k=None)
    if spec.num_beams > 1:
        kwargs.update(length_penalty=spec.length_penalty, early_stopping=True)
    if spec.no_repeat_ngram_size:
        kwargs["no_repeat_ngram_size"] = spec.no_repeat_ngram_size
    return kwargs


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def left_pad(batch: Sequence[Sequence[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, ids in enumerate(batch):
        input_ids[i, width - len(ids):] = torch.tensor(list(ids), dtype=torch.long)
        attention_mask[i, width - len(ids):] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def new_text(tokenizer: Any, row: torch.Tensor) -> tuple[int, str]:
    """(tokens, text) of one row of newly generated ids: cut after the first EOS (the rest is padding)."""
    ids = row.tolist()
    if tokenizer.eos_token_id in ids:
        ids = ids[:ids.index(tokenizer.eos_token_id) + 1]
    return len(ids), tokenizer.decode(ids, skip_special_tokens=True).strip()


@torch.no_grad()
def generate(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[Sequence[int]], spec: GenerationSpec,
             *, progress: Any = None) -> Generated:
    """Decode every prompt on the model's device; `progress` (a tqdm bar) is advanced by the prompts done."""
    model.eval()
    device = model_device(model)
    kwargs = generate_kwargs(spec, tokenizer)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    texts: list[str] = [""] * len(prompts)
    counts = [0] * len(prompts)
    result = Generated(texts, per_item_tokens=counts)
    if spec.do_sample:
        torch.manual_seed(spec.seed)
    for start in range(0, len(order), spec.batch_size):
        chosen = order[start:start + spec.batch_size]
        batch = {k: v.to(device) for k, v in left_pad([prompts[i] for i in chosen], tokenizer.pad_token_id).items()}
        began = time.perf_counter()
        output = model.generate(**batch, **kwargs)
        result.seconds += time.perf_counter() - began
        new = output[:, batch["input_ids"].shape[1]:].cpu()
        for row, index in zip(new, chosen):
            counts[index], texts[index] = new_text(tokenizer, row)
        if progress is not None:
            progress.update(len(chosen))
    result.new_tokens = sum(counts)
    return result
