"""The causal-LM paths (instruction tuning, data-to-text) end to end on a tiny Llama saved to disk."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline import adapters, chat, data, datafiles, tracking
from pipeline.config import load_config
from pipeline.evaluate import score_adapter_dir
from pipeline.run import run_pipeline
from pipeline.trial_worker import evaluate
from tests.support.configs import head_jsonl, write_yaml

pytestmark = pytest.mark.slow


def causal_config(tmp: Path, model_dir: Path, data_section: dict, name: str) -> dict:
    return {
        "name": name,
        "model": {"name_or_path": str(model_dir)},
        "data": {**data_section, "max_seq_len": 256},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"]},
        "train": {"lr": 1e-2, "epochs": 2, "batch_size": 8, "eval_every_steps": 8, "log_every_steps": 2, "warmup_ratio": 0.1},
        "sweep": {"searcher": "grid", "scheduler": "fifo", "metric": "eval_loss", "mode": "min",
                  "parameters": {"lora.r": {"grid": [4, 8]}}},
        "tracking": {"tracking_uri": f"sqlite:///{tmp / 'mlruns.db'}", "experiment_name": name,
                     "registered_model_name": f"{name}-lora"},
        "eval": {"suites": []},
        "ray": {"storage_path": str(tmp / "ray_results"), "warm_workers": False},
    }


def base_model_loss(config) -> float:
    tokenizer = adapters.load_tokenizer(config.model, config.data)
    model = adapters.load_base_model(config.model, config.data).eval()
    examples = data.tokenize_rows(config.data, data.load_split(config.data, "eval"), tokenizer)
    return evaluate(model, examples, config, tokenizer.pad_token_id, torch.device("cpu"), 0, 1)["eval_loss"]


# a chat template for the tiny Llama, whose tokenizer has none (SmolLM2's own is tested in test_chat.py)
TINY_CHAT_TEMPLATE = ("{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}{% if m['role'] == 'assistant' %}"
                      "</s>{% endif %}\n{% endfor %}{% if add_generation_prompt %}### assistant:\n{% endif %}")


@pytest.mark.parametrize("kind", ["instruction", "data_to_text", "chat"])
def test_causal_task_trains_registers_and_reloads(kind: str, tmp_path: Path, tiny_causal_model: Path, ray_local):
    if kind == "chat":  # FastChat's identity conversations, one file split by row ranges
        identity = datafiles.require("sharegpt_identity/dummy_conversation.json")
        section = {"kind": "chat", "train_path": str(identity), "eval_path": str(identity),
                   "train_rows": [0, 96], "eval_rows": [450, 474], "prompt_template": TINY_CHAT_TEMPLATE}
    elif kind == "instruction":
        section = {"kind": "instruction",
                   "train_path": str(head_jsonl("alpaca/train.jsonl", tmp_path / "train.jsonl", 96)),
                   "eval_path": str(head_jsonl("alpaca/train.jsonl", tmp_path / "eval.jsonl", 24, start=1000)),
                   "max_truncated_fraction": 0.9}
    else:
        section = {"kind": "data_to_text",
                   "train_path": str(head_jsonl("e2e/train.jsonl", tmp_path / "train.jsonl", 96)),
                   "eval_path": str(head_jsonl("e2e/dev.jsonl", tmp_path / "eval.jsonl", 24))}
    raw = causal_config(tmp_path, tiny_causal_model, section, f"tiny-{kind}")
    if kind == "chat":  # perplexity on the held-out conversations' assistant turns, and replies, in the eval stage
        raw["eval"].update({"suites": ["perplexity", "replies"],
                            "replies": {"prompts": ["Who are you?"], "max_conversations": 4,
                                        "generation": {"max_new_tokens": 8}}})
    if kind != "instruction":
        # one trial: picking the best of several is the same for every data kind (the instruction case,
        # test_pipeline_e2e); what this case adds is the data kind's own training, registration and reload
        raw["sweep"]["parameters"] = {"lora.r": {"grid": [8]}}
    config = load_config(write_yaml(tmp_path / "c.yaml", raw), env={})
    result = run_pipeline(config, reports_dir=tmp_path / "reports")
    assert len(result.sweep.trials) == (2 if kind == "instruction" else 1)
    if kind == "chat":  # the eval stage's perplexity counts the held-out assistant turns' tokens, nothing else
        scored = result.evaluation.results["suites"]["perplexity"]
        tokenizer = adapters.load_tokenizer(config.model, config.data)
        held_out = data.tokenize_rows(config.data, data.load_split(config.data, "eval"), tokenizer)
        assert scored["candidate"]["tokens"] == sum(t != data.IGNORE_INDEX for e in held_out for t in e.labels)
        assert scored["candidate"]["loss"] < scored["base"]["loss"] - 0.05
        replies = result.evaluation.results["suites"]["replies"]
        assert replies["candidate"]["replies"] == replies["base"]["replies"] == 5.0
        assert 0.0 <= replies["candidate"]["reference_f1"] <= 1.0
        asked = {it["model"]: it for it in result.evaluation.results["items"] if it["suite"] == "replies" and it["id"] == 0}
        assert asked["candidate"]["prompt"] == "Who are you?" and asked["candidate"]["reference"] is None
        [report] = (tmp_path / "reports").rglob("eval_report.md")
        assert "## Replies" in report.read_text() and "| Who are you? |" in report.read_text()

    client = tracking.client(config.tracking.tracking_uri)
    version = client.get_model_version_by_alias(f"tiny-{kind}-lora", "candidate")
    assert version.run_id == result.sweep.best.run_id
    assert result.eval_metrics["eval_loss"] == pytest.approx(result.sweep.best.best_metric, rel=1e-5)
    # training did something: the adapter beats the untouched base on held-out rows
    assert result.eval_metrics["eval_loss"] < base_model_loss(config) - 0.05
    # the registered folder is plain PEFT and reloads without Ray
    adapter_dir = tracking.download_registered(config.tracking.tracking_uri, f"tiny-{kind}-lora", "candidate", tmp_path / "dl")
    assert (adapter_dir / "adapter_model.safetensors").is_file()
    assert score_adapter_dir(adapter_dir, config)["eval_loss"] == pytest.approx(result.eval_metrics["eval_loss"], rel=1e-5)

    # the version is an MLflow Model: pyfunc generates text, the same our own decoding gives the same adapter
    import mlflow
    import pandas as pd

    from pipeline.eval import stage
    from pipeline.eval.generation import generate
    from pipeline.registry import mlflow_model

    rows = data.load_split(config.data, "eval")[:3]
    if kind == "chat":  # `messages`: each conversation before its last reply, OpenAI roles
        frame = pd.DataFrame({"messages": [chat.prompt_messages(data.conversation(config.data, r)) for r in rows]})
    else:
        frame = pd.DataFrame([{c: r.get(c) or "" for c, _ in mlflow_model.input_columns(config)} for r in rows])
    with tracking.process_uri(config.tracking.tracking_uri):
        model = mlflow.pyfunc.load_model(f"models:/tiny-{kind}-lora@candidate")
        texts = model.predict(frame, params={"max_new_tokens": 8})["text"].tolist()
    peft_model, tokenizer = stage.load_model(config, str(adapter_dir), tmp_path / "w")
    want = generate(peft_model, tokenizer, [data.prompt_ids(config.data, r, tokenizer) for r in rows],
                    config.eval.generation.model_copy(update={"max_new_tokens": 8})).texts
    assert texts == want and any(texts)
    if kind == "chat":  # the stage's reply to "Who are you?" is the registered model's
        who = model.predict(pd.DataFrame({"messages": [[{"role": "user", "content": "Who are you?"}]]}),
                            params={"max_new_tokens": 8})["text"][0]
        assert who == asked["candidate"]["reply"]
    assert model.metadata.get_params_schema().to_dict()[0]["name"] == "max_new_tokens"
