"""`data:`: the training and evaluation files, one variant per task kind."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import Field, field_validator

from pipeline.config.base import StrictModel


class _DataCommon(StrictModel):
    train_path: Path = Field(description="JSONL or CSV file with the training rows.")
    eval_path: Path = Field(description="JSONL or CSV file with the evaluation rows (all are used).")
    max_train_examples: int | None = Field(
        None, gt=0, description="Use a seeded random subset of this many training rows."
    )
    max_eval_examples: int | None = Field(None, gt=0, description="Cap on evaluation rows (default: all).")
    max_seq_len: int = Field(128, gt=0, description="Tokens per example after truncation.")
    max_truncated_fraction: float = Field(
        0.05, ge=0, le=1, description="Fail if more than this fraction of training rows would be truncated."
    )
    train_rows: tuple[int, int] | None = Field(None, description=(
        "Use rows [start, stop) of the training file (0-based, before max_train_examples): one file split into "
        "train and eval by row ranges."))
    eval_rows: tuple[int, int] | None = Field(None, description="Use rows [start, stop) of the evaluation file.")

    @field_validator("train_rows", "eval_rows")
    @classmethod
    def _row_range(cls, rows: tuple[int, int] | None) -> tuple[int, int] | None:
        if rows is not None and not 0 <= rows[0] < rows[1]:
            raise ValueError(f"must be [start, stop) with 0 <= start < stop, got {list(rows)}")
        return rows

    @field_validator("train_path", "eval_path")
    @classmethod
    def _suffix(cls, path: Path) -> Path:
        if path.suffix.lower() not in {".jsonl", ".json", ".csv"}:
            raise ValueError(f"must be a .jsonl, .json or .csv file, got {str(path)!r}")
        return path


class ClassificationData(_DataCommon):
    """Sequence classification (SST-2 style): text -> label id."""

    kind: Literal["classification"]
    text_field: str = Field("text", description="Column with the input text.")
    text_pair_field: str | None = Field(None, description="Second text column for sentence-pair tasks.")
    label_field: str = Field("label", description="Column with the integer label.")
    num_labels: int = Field(ge=2, description="Number of classes; labels must be ints in [0, num_labels).")


DATA_TO_TEXT_PROMPT = "{source}\n### Text:\n"
ALPACA_PROMPT = (
    "Below is an instruction that describes a task{input_clause}. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)


class InstructionData(_DataCommon):
    """Instruction tuning (Alpaca style) for a causal LM; loss only on the response."""

    kind: Literal["instruction"]
    instruction_field: str = Field("instruction", description="Column with the instruction.")
    input_field: str | None = Field("input", description="Column with the optional input; none: there is none.")
    response_field: str = Field("output", description="Column with the response (the only tokens with loss).")
    prompt_template: str | None = Field(None, description=(
        "Prompt with `{instruction}` and `{input}`; default: the tokenizer's chat template when it has one, "
        "else the Alpaca prompt."))

    @field_validator("prompt_template")
    @classmethod
    def _has_instruction(cls, template: str | None) -> str | None:
        if template is not None and "{instruction}" not in template:
            raise ValueError("prompt_template must contain '{instruction}'")
        return template


class DataToTextData(_DataCommon):
    """Data-to-text (E2E NLG style) for a causal LM: meaning representation -> text."""

    kind: Literal["data_to_text"]
    source_field: str = Field("mr", description="Column with the meaning representation.")
    target_field: str = Field("ref", description="Column with the reference text (the only tokens with loss).")
    prompt_template: str | None = Field(None, description=(
        "Prompt with `{source}`; default: the tokenizer's chat template when it has one, else "
        "`{source}\n### Text:\n`."))

    @field_validator("prompt_template")
    @classmethod
    def _has_source(cls, template: str | None) -> str | None:
        if template is not None and "{source}" not in template:
            raise ValueError("prompt_template must contain '{source}'")
        return template


# conversation layouts: the column a row keeps its messages in, each message's role and text keys, the roles
CHAT_FORMATS: dict[str, dict[str, Any]] = {
    "openai": {"column": "messages", "role": "role", "text": "content",
               "roles": {"system": "system", "user": "user", "assistant": "assistant"}},
    "sharegpt": {"column": "conversations", "role": "from", "text": "value",
                 "roles": {"system": "system", "human": "user", "gpt": "assistant"}},
}


class ChatData(_DataCommon):
    """Conversations for a causal LM (OpenAI `messages` or ShareGPT `conversations`): the loss covers the
    assistant turns (with their end-of-turn token) and nothing of system or user turns."""

    kind: Literal["chat"]
    format: Literal["auto", "openai", "sharegpt"] = Field("auto", description=(
        "openai: `messages` of {role: system|user|assistant, content}; sharegpt: `conversations` of "
        "{from: system|human|gpt, value}; auto: the first row's column decides, and every row must match it."))
    messages_field: str | None = Field(None, description=(
        "Column with the conversation (default: messages for openai, conversations for sharegpt)."))
    train_on: Literal["all_assistant", "last_assistant"] = Field("all_assistant", description=(
        "Which assistant turns carry loss: every one, or only the last of each conversation."))
    prompt_template: str | None = Field(None, description=(
        "A Jinja chat template (Hugging Face's format: `messages` with role and content, `add_generation_prompt`) "
        "for a tokenizer without one; default: the tokenizer's own chat template."))


DataSpec = Annotated[Union[ClassificationData, InstructionData, DataToTextData, ChatData], Field(discriminator="kind")]
