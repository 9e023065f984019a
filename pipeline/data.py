"""Local JSONL/CSV datasets -> tokenized examples -> padded batches, for three task kinds.

One interface for all kinds: `load_split` reads and validates a file,
`tokenize_split` turns rows into `input_ids` / `labels` per the task kind, and
`make_batches` + `collate` produce what the model consumes. Classification labels
are class ids; causal-LM labels are token ids with the prompt masked to -100 so
the loss covers the response only.
"""

from __future__ import annotations

import math
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from pipeline import chat
from pipeline.config import (
    ALPACA_PROMPT,
    DATA_TO_TEXT_PROMPT,
    ChatData,
    ClassificationData,
    ConfigError,
    DataToTextData,
    InstructionData,
)

IGNORE_INDEX = -100
DataSpec = ClassificationData | InstructionData | DataToTextData | ChatData
CausalSpec = InstructionData | DataToTextData | ChatData


def required_columns(spec: DataSpec) -> dict[str, type | tuple[type, ...]]:
    """Column name -> accepted Python type(s) for the task kind."""
    match spec:
        case ClassificationData():
            cols: dict[str, Any] = {spec.text_field: str, spec.label_field: int}
            if spec.text_pair_field:
                cols[spec.text_pair_field] = str
            return cols
        case InstructionData():
            cols = {spec.instruction_field: str, spec.response_field: str}
            if spec.input_field:
                cols[spec.input_field] = (str, type(None))
            return cols
        case DataToTextData():
            return {spec.source_field: str, spec.target_field: str}
        case ChatData():
            return {}  # the conversation column depends on the layout: chat.check_rows
    raise TypeError(f"unknown data spec {spec!r}")


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Read a local JSONL/JSON/CSV file with `datasets` (no hub access) into a list of dicts."""
    import datasets

    with path.open("rb") as f:  # stops at the first non-blank line; datasets chokes on empty input
        if not any(line.strip() for line in f):
            return []
    _check_lines(path)
    builder = "csv" if path.suffix.lower() == ".csv" else "json"
    datasets.disable_progress_bars()
    try:
        dataset = datasets.load_dataset(builder, data_files=str(path), split="train", keep_in_memory=True)
    except Exception as err:  # any parse failure is the file's fault: say which file
        raise ValueError(f"cannot read {path} as {builder.upper()}: {err.__class__.__name__}: {err}") from None
    return dataset.to_list()


def _check_lines(path: Path) -> None:
    """ValueError naming the line when the file is not UTF-8, or (JSONL) a row is not one complete JSON
    object, such as the last row of a file cut short; `datasets` would name neither."""
    jsonl = path.suffix.lower() == ".jsonl"
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{path}: line {number} is not UTF-8 text (byte {raw[err.start:err.start + 1]!r} at "
                                 f"column {err.start + 1}); save the file as UTF-8") from None
            if not jsonl or not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as err:
                cut = "" if raw.endswith(b"\n") else "; it is the last line and has no line end, so the file was cut short"
                raise ValueError(f"{path}: line {number} is not a complete JSON row ({err.msg} at column "
                                 f"{getattr(err, 'colno', '?')}){cut}; fix or remove that line") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}: line {number} is a JSON {type(row).__name__}, not an object of columns; "
                                 "each line must be one row like {\"text\": ..., \"label\": ...}")


def check_rows(rows: list[dict[str, Any]], spec: DataSpec, split: str, path: Path) -> list[str]:
    """Every problem with `rows` for this task kind: missing columns, wrong types, bad labels, emptiness."""
    where = f"data.{split}_path ({path})"
    if not rows:
        return [f"{where}: the file has no rows; point it at a non-empty dataset"]
    if isinstance(spec, ChatData):
        return chat.check_rows(rows, spec, where)
    problems = []
    present = set(rows[0])
    for column, kinds in required_columns(spec).items():
        if column not in present:
            field = _field_naming(spec, column)
            problems.append(
                f"{where}: missing column {column!r} (columns present: {sorted(present)}); "
                f"set data.{field} to one of them"
            )
    if problems:
        return problems
    for column, kinds in required_columns(spec).items():
        for index, row in enumerate(rows):
            value = row.get(column)
            if not isinstance(value, kinds) or isinstance(value, bool):
                problems.append(
                    f"{where}: row {index}: column {column!r} must be {_type_names(kinds)}, got {value!r}"
                )
                break
    if isinstance(spec, ClassificationData) and not problems:
        for index, row in enumerate(rows):
            label = row[spec.label_field]
            if not 0 <= label < spec.num_labels:
                problems.append(
                    f"{where}: row {index}: label {label} outside [0, {spec.num_labels}); "
                    "fix the row or data.num_labels"
                )
                break
    text_columns = [c for c, k in required_columns(spec).items() if k is str]
    empty = [i for i, row in enumerate(rows) if all(not str(row.get(c) or "").strip() for c in text_columns)]
    if len(empty) == len(rows):
        problems.append(f"{where}: all {len(rows)} rows have empty text; nothing to train on")
    return problems


def _field_naming(spec: DataSpec, column: str) -> str:
    for name, value in spec.model_dump().items():
        if name.endswith("_field") and value == column:
            return name
    return "<field>"


def _type_names(kinds: type | tuple[type, ...]) -> str:
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    return " or ".join("null" if k is type(None) else k.__name__ for k in kinds)


def load_split(spec: DataSpec, split: str, seed: int = 0) -> list[dict[str, Any]]:
    """Rows of `split` ("train" or "eval"), validated, subsampled as the spec says (seeded)."""
    path = spec.train_path if split == "train" else spec.eval_path
    if not path.is_file():
        raise ConfigError([f"data.{split}_path: file {str(path)!r} not found"])
    try:
        rows = read_rows(path)
    except ValueError as err:
        raise ConfigError([f"data.{split}_path: {err}"]) from None
    problems = check_rows(rows, spec, split, path)
    if problems:
        raise ConfigError(problems)
    limit = spec.max_train_examples if split == "train" else spec.max_eval_examples
    if (span := spec.train_rows if split == "train" else spec.eval_rows) is not None:
        if span[1] > len(rows):
            raise ConfigError([f"data.{split}_rows: [{span[0]}, {span[1]}) reaches past the {len(rows)} rows of "
                               f"{path}; end it at {len(rows)} or less"])
        rows = rows[span[0]:span[1]]
    if limit is not None and limit < len(rows):
        # a seeded random subset, not the head: GLUE files are ordered
        rows = random.Random(seed).sample(rows, limit)
    return rows


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int] | int
    untruncated_length: int


def uses_chat_template(spec: CausalSpec, tokenizer: Any) -> bool:
    """Prompts go through the tokenizer's chat template when it has one and the config gives no template
    (conversations always do: their prompt_template is itself a chat template)."""
    if isinstance(spec, ChatData):
        return True
    return spec.prompt_template is None and bool(getattr(tokenizer, "chat_template", None))


def conversation(spec: ChatData, row: dict[str, Any]) -> list[dict[str, str]]:
    """A checked row's messages as [{role, content}] (roles system, user, assistant)."""
    fmt = chat.detect_format(spec, row)
    assert fmt is not None, "rows are checked before use"
    return chat.messages_of(spec, fmt, row)


def _instruction_and_input(spec: InstructionData, row: dict[str, Any]) -> tuple[str, str]:
    extra = (row.get(spec.input_field) or "").strip() if spec.input_field else ""
    return row[spec.instruction_field].strip(), extra


def _user_message(spec: InstructionData | DataToTextData, row: dict[str, Any]) -> str:
    match spec:
        case InstructionData():
            instruction, extra = _instruction_and_input(spec, row)
            return f"{instruction}\n\n{extra}" if extra else instruction
        case DataToTextData():
            return str(row[spec.source_field])
    raise TypeError(f"not a causal task: {spec!r}")


def prompt_text(spec: InstructionData | DataToTextData, row: dict[str, Any]) -> str:
    """The task's own prompt (no chat template): the config's template, or Alpaca / `{source}\n### Text:\n`."""
    match spec:
        case InstructionData():
            instruction, extra = _instruction_and_input(spec, row)
            if spec.prompt_template is not None:
                return spec.prompt_template.format(instruction=instruction, input=extra)
            return ALPACA_PROMPT.format(
                input_clause=", paired with an input that provides further context" if extra else "",
                instruction=instruction,
                input_block=f"### Input:\n{extra}\n\n" if extra else "",
            )
        case DataToTextData():
            return (spec.prompt_template or DATA_TO_TEXT_PROMPT).format(source=row[spec.source_field])
    raise TypeError(f"not a causal task: {spec!r}")


def prompt_ids(spec: CausalSpec, row: dict[str, Any], tokenizer: Any) -> list[int]:
    """Token ids of the prompt the model answers, the same in training and in generation (a conversation:
    every turn before its last assistant turn, with the generation prompt)."""
    if isinstance(spec, ChatData):
        return reply_prompt_ids(spec, chat.prompt_messages(conversation(spec, row)), tokenizer)
    if uses_chat_template(spec, tokenizer):
        messages = [{"role": "user", "content": _user_message(spec, row)}]
        return chat_ids(tokenizer, messages)
    return list(tokenizer(prompt_text(spec, row), add_special_tokens=True)["input_ids"])


def reply_prompt_ids(spec: ChatData, messages: list[dict[str, str]], tokenizer: Any) -> list[int]:
    """A conversation ([{role, content}], OpenAI roles) rendered with the assistant's turn opened, as trained."""
    text = chat.render(spec, tokenizer, [{"role": m["role"], "content": m["content"]} for m in messages], True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def chat_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """The chat template applied to `messages`, ending with the assistant's turn opened."""
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(encoded["input_ids"])


def target_text(spec: CausalSpec, row: dict[str, Any]) -> str:
    match spec:
        case InstructionData():
            return row[spec.response_field]
        case ChatData():
            return chat.reply(conversation(spec, row))
    return row[spec.target_field]


def tokenize_rows(spec: DataSpec, rows: Sequence[dict[str, Any]], tokenizer: Any) -> list[Example]:
    """Tokenize rows per task kind, truncating to `spec.max_seq_len`."""
    max_len = spec.max_seq_len
    examples = []
    if isinstance(spec, ClassificationData):
        texts = [row[spec.text_field] for row in rows]
        pairs = [row[spec.text_pair_field] for row in rows] if spec.text_pair_field else None
        encoded = tokenizer(texts, pairs, truncation=False, add_special_tokens=True)["input_ids"]
        for row, ids in zip(rows, encoded):
            examples.append(Example(ids[: max_len - 1] + ids[-1:] if len(ids) > max_len else ids,
                                    int(row[spec.label_field]), len(ids)))
        return examples
    if isinstance(spec, ChatData):
        if not chat.has_template(spec, tokenizer):
            raise ConfigError([f"data.prompt_template: the tokenizer of {getattr(tokenizer, 'name_or_path', 'the model')} "
                               "has no chat template; give a Jinja chat template (Hugging Face's format)"])
        for index, row in enumerate(rows):
            try:
                tokens = chat.tokenize(spec, tokenizer, conversation(spec, row))
            except chat.TemplateError as err:
                raise ConfigError([f"data: row {index}: {err}"]) from None
            ids, labels = chat.truncate(tokens, max_len)
            examples.append(Example(ids, labels, len(tokens.input_ids)))
        return examples
    eos = tokenizer.eos_token or ""
    for row in rows:
        prompt = prompt_ids(spec, row, tokenizer)
        target_ids = tokenizer(target_text(spec, row) + eos, add_special_tokens=False)["input_ids"]
        ids = prompt + target_ids
        labels = [IGNORE_INDEX] * len(prompt) + target_ids
        examples.append(Example(ids[:max_len], labels[:max_len], len(ids)))
    return examples


def with_targets(examples: Sequence[Example]) -> list[Example]:
    """Drop causal examples whose response was truncated away entirely (their loss would be 0/0)."""
    return [e for e in examples if isinstance(e.labels, int) or any(t != IGNORE_INDEX for t in e.labels)]


def truncated_fraction(examples: Sequence[Example], max_seq_len: int) -> float:
    if not examples:
        return 0.0
    return sum(e.untruncated_length > max_seq_len for e in examples) / len(examples)


def make_batches(
    lengths: Sequence[int],
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    bucketing: bool,
    rank: int = 0,
    world_size: int = 1,
) -> list[list[int]]:
    """Index batches for one epoch on one rank.

    With bucketing, examples are sorted by length before slicing into batches so
    each batch pads little, then the batch order is shuffled. Every rank gets the
    same number of batches (DDP needs equal step counts); the remainder is dropped.
    """
    order = list(range(len(lengths)))
    rng = random.Random(seed)
    if bucketing:
        # shuffle first so equal lengths are not always batched in file order
        rng.shuffle(order)
        order.sort(key=lambda i: lengths[i])
    elif shuffle:
        rng.shuffle(order)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if shuffle:
        rng.shuffle(batches)
    per_rank = len(batches) // world_size if world_size > 1 else len(batches)
    return batches[rank::world_size][:per_rank]


def steps_per_epoch(num_examples: int, batch_size: int, grad_accum: int, world_size: int) -> int:
    batches = math.ceil(num_examples / batch_size)
    per_rank = batches // world_size if world_size > 1 else batches
    return max(1, per_rank // grad_accum)


def collate(examples: Sequence[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest example; token labels are padded with -100."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    token_labels = not isinstance(examples[0].labels, int)
    labels = (
        torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        if token_labels
        else torch.tensor([e.labels for e in examples], dtype=torch.long)
    )
    for i, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[i, :n] = torch.tensor(example.input_ids)
        attention_mask[i, :n] = 1
        if token_labels:
            labels[i, :n] = torch.tensor(example.labels)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
