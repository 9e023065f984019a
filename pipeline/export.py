"""Export: merge an adapter into a full-precision copy of its base for zero-latency inference.

W = W0 + (alpha/r)·B·A is folded into the base weights with PEFT's `merge_and_unload`.
For a QLoRA adapter, W0 is the base *as the adapter was trained against it*: the
NF4 weights dequantized to full precision, not the original checkpoint. Before
saving, the merged model's outputs are compared with the unmerged model's (the
4-bit base + adapter for QLoRA) on real eval rows, and the max abs difference is
written next to the weights.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from pipeline import adapters, atomic, data, strategies, tracking
from pipeline.config import ExperimentConfig

REPORT_FILE = "loraforge_merge.json"


@dataclass
class MergeReport:
    out_dir: str
    base: str
    quantized_base: bool
    max_abs_diff: float
    examples: int
    parameters: int


@torch.no_grad()
def logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's logits on `batch` in eval mode, as float32 on the CPU (the batch moved to the model's device)."""
    model.eval()
    device = next(model.parameters()).device
    out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
    return out.logits.float().cpu()


def sample_batch(config: ExperimentConfig, tokenizer: object, n: int = 32) -> dict[str, torch.Tensor]:
    rows = data.load_split(config.data, "eval", config.train.seed)[:n]
    return data.collate(data.tokenize_rows(config.data, rows, tokenizer), tokenizer.pad_token_id)  # type: ignore[attr-defined]


def merged_model(config: ExperimentConfig, unmerged: nn.Module, adapter_dir: Path) -> nn.Module:
    """`unmerged` (base + the adapter in `adapter_dir`) with the adapter folded in; `unmerged` is used up.

    Merging into 4-bit weights would requantize: for QLoRA the base becomes full-precision weights equal to
    the NF4 values the adapter saw in training, with the adapter loaded on top again, then merged."""
    from peft import PeftModel

    if strategies.quant_spec(config) is not None:
        base = unmerged.unload().dequantize().to(torch.float32)
        unmerged = PeftModel.from_pretrained(base, str(adapter_dir))
    return unmerged.merge_and_unload()


def merge(adapter_dir: Path, config: ExperimentConfig, out_dir: Path, num_examples: int = 32) -> MergeReport:
    """Write base+adapter merged as safetensors (+ tokenizer) into `out_dir`; raise if outputs disagree."""

    tokenizer = adapters.load_tokenizer(config.model, config.data)
    batch = sample_batch(config, tokenizer, num_examples)
    quantized = strategies.quant_spec(config) is not None

    # the reference: the adapter on the base it was trained with (4-bit for QLoRA)
    unmerged = strategies.load_trained(config, adapter_dir)
    expected = logits(unmerged, batch)

    merged = merged_model(config, unmerged, adapter_dir)
    got = logits(merged, batch)
    diff = float((got - expected).abs().max())

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    report = MergeReport(str(out_dir), config.model.name_or_path, quantized, diff, int(batch["input_ids"].shape[0]),
                         sum(p.numel() for p in merged.parameters()))
    atomic.write_text(out_dir / REPORT_FILE, json.dumps(asdict(report), indent=2))
    return report


def merge_registered(config: ExperimentConfig, model_uri: str | None, out_dir: Path) -> MergeReport:
    """Merge `models:/<name>@<alias>` or `models:/<name>/<version>` (default: the config's registered model and alias)."""
    model_uri = model_uri or f"models:/{config.tracking.registered_model_name}@{config.tracking.alias}"
    with tempfile.TemporaryDirectory(prefix="loraforge-export-") as tmp:
        adapter_dir = tracking.fetch_adapter(model_uri, config.tracking.tracking_uri, Path(tmp))
        return merge(adapter_dir, config, out_dir)
