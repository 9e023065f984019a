"""One-load evaluation: every model of a stage (base, candidate, trials) on one base load, adapters side by side.

The one-load task (`stage.run_shard_one_load`) must give what one task per model (`stage.run_shard`) gives:
perplexity to 1e-5, classification predictions and logits, greedy and beam texts identical; for adapters of
different ranks, target sets and variants (a converted PiSSA adapter, DoRA), and on a 4-bit base."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline import adapters
from pipeline.config import load_config
from pipeline.eval import stage
from tests.support.configs import head_jsonl, minilm_config, write_yaml

# single-process, but about 20 model loads: the slow lane keeps the fast one under 3 minutes
pytestmark = pytest.mark.slow

# (r, targets, variant fields): mixed ranks, target sets and variants
ADAPTERS = [(4, "attention_qv", {}), (8, "mlp", {"use_dora": True}), (2, "attention_mlp", {"init": "pissa"})]


def trained_adapters(config, root: Path, specs=ADAPTERS, load_base=None) -> list[str]:
    """Adapter folders as training leaves them: attached (to `load_base()`, default the full-precision base),
    every trainable tensor moved, saved."""
    load_base = load_base or (lambda: adapters.load_base_model(config.model, config.data))
    folders = []
    for i, (r, targets, extra) in enumerate(specs):
        lora = config.lora.model_copy(update={"r": r, "alpha": 2.0 * r, "target_modules": targets, **extra})
        torch.manual_seed(i)
        model = adapters.attach_lora(load_base(), lora, config.data)
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:
                    param.add_(torch.randn_like(param) * 0.05)
        folders.append(str(adapters.save_adapter(model, root / f"a{i}", {"task": config.data.kind})))
    return folders


def one_at_a_time(config, suite: str, refs: list[str | None], items: list[dict]) -> list[dict]:
    return [stage.run_shard(config.model_dump(mode="json"), suite, ref, items, f"m{i}") for i, ref in enumerate(refs)]


def one_load(config, suite: str, refs: list[str | None], items: list[dict]) -> list[dict]:
    return stage.run_shard_one_load(config.model_dump(mode="json"), suite, refs, items, [f"m{i}" for i in range(len(refs))])


def causal_config(tmp_path: Path, model: Path, kind: str, **sections):
    if kind == "data_to_text":
        section = {"kind": "data_to_text", "train_path": str(head_jsonl("e2e/dev.jsonl", tmp_path / "d.jsonl", 12)),
                   "eval_path": str(head_jsonl("e2e/dev.jsonl", tmp_path / "d.jsonl", 12))}
    else:
        section = {"kind": "instruction", "train_path": str(head_jsonl("alpaca/train.jsonl", tmp_path / "a.jsonl", 12)),
                   "eval_path": str(head_jsonl("alpaca/train.jsonl", tmp_path / "a.jsonl", 12)),
                   "max_truncated_fraction": 1.0}
    raw = {"name": "one-load", "model": {"name_or_path": str(model)}, "data": {**section, "max_seq_len": 96},
           "lora": {"dropout": 0.0}, "eval": {"batch_size": 4, "generation": {"max_new_tokens": 6, "batch_size": 4}},
           "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'm.db'}"}, "ray": {"storage_path": str(tmp_path / "r")},
           **sections}
    return load_config(write_yaml(tmp_path / f"{kind}.yaml", raw), env={})


def test_perplexity_on_one_load_equals_one_model_a_task(tmp_path: Path, tiny_causal_model: Path):
    from pipeline.eval import catalog

    config = causal_config(tmp_path, tiny_causal_model, "instruction")
    refs = [None, *trained_adapters(config, tmp_path)]
    items = catalog.get("perplexity").items(config)
    apart, together = one_at_a_time(config, "perplexity", refs, items), one_load(config, "perplexity", refs, items)
    assert len(together) == len(refs)
    for a, b in zip(apart, together):
        assert [it["tokens"] for it in a["items"]] == [it["tokens"] for it in b["items"]]
        assert [it["nll"] for it in b["items"]] == pytest.approx([it["nll"] for it in a["items"]], rel=1e-5)
    # and the models differ from each other: each adapter was active in turn
    assert len({round(sum(it["nll"] for it in out["items"]), 3) for out in together}) == len(refs)
    assert sum(it["tokens"] for it in together[0]["items"]) > 0


@pytest.mark.parametrize("decoding", [{}, {"num_beams": 3, "length_penalty": 0.8, "no_repeat_ngram_size": 2}])
def test_greedy_and_beam_texts_on_one_load_equal_one_model_a_task(tmp_path: Path, tiny_causal_model: Path,
                                                                   decoding: dict):
    from pipeline.eval import catalog

    config = causal_config(tmp_path, tiny_causal_model, "data_to_text",
                           eval={"batch_size": 4, "generation": {"max_new_tokens": 6, "batch_size": 4, **decoding}})
    refs = [None, *trained_adapters(config, tmp_path)]
    items = catalog.get("e2e_nlg").items(config)[:5]
    apart, together = one_at_a_time(config, "e2e_nlg", refs, items), one_load(config, "e2e_nlg", refs, items)
    texts = [[it["prediction"] for it in out["items"]] for out in together]
    assert texts == [[it["prediction"] for it in out["items"]] for out in apart]
    assert len({tuple(t) for t in texts}) > 1


def test_classification_on_one_load_equals_one_model_a_task(tmp_path: Path, sst2_small):
    from pipeline.eval import catalog

    raw = minilm_config(tmp_path, sst2_small)
    raw["eval"] = {"batch_size": 16}
    config = load_config(write_yaml(tmp_path / "c.yaml", raw), env={})
    refs = [None, *trained_adapters(config, tmp_path, [(4, "attention_qv", {}), (8, "mlp", {}),
                                                        (2, "attention_all", {"use_rslora": True})])]
    items = catalog.get("classification").items(config)[:32]
    apart, together = one_at_a_time(config, "classification", refs, items), one_load(config, "classification", refs, items)
    assert [out["items"] for out in together] == [out["items"] for out in apart]
    # the logits themselves, each adapter (and its own trained head) active in turn on the shared load
    batch = {"input_ids": torch.tensor([[101, 2023, 3185, 2001, 2307, 102]])}
    model, _, names = stage.load_models(config, refs, tmp_path / "w")
    for ref, name in zip(refs, names):
        alone, _ = stage.load_model(config, ref, tmp_path / "w1")
        with torch.no_grad(), stage.active(model, name):
            torch.testing.assert_close(model(**batch).logits, alone(**batch).logits, rtol=1e-5, atol=1e-5)


def test_one_load_on_a_4bit_base(tmp_path: Path, tiny_causal_model: Path):
    from pipeline import strategies
    from pipeline.eval import catalog

    config = causal_config(tmp_path, tiny_causal_model, "instruction",
                           strategy={"kind": "qlora", "compute_dtype": "float32"})
    refs = [None, *trained_adapters(config, tmp_path, [(4, "attention_qv", {}), (8, "mlp", {})],
                                    lambda: strategies.load_quantized_base(config, config.strategy, torch.device("cpu")))]
    items = catalog.get("perplexity").items(config)
    apart, together = one_at_a_time(config, "perplexity", refs, items), one_load(config, "perplexity", refs, items)
    for a, b in zip(apart, together):
        assert [it["nll"] for it in b["items"]] == pytest.approx([it["nll"] for it in a["items"]], rel=1e-5)
