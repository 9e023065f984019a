"""Conversations (`data.kind: chat`): rows checked, rendered with a chat template, the assistant turns marked.

A row holds one conversation, OpenAI `messages` ({role, content}) or ShareGPT `conversations`
({from, value}); both become a list of {role, content} with roles system, user and assistant.
The loss covers the assistant turns (every one, or the last: `data.train_on`) including the
template's end-of-turn tokens, and nothing of system or user turns.

Marking works on the template's own rendering: the conversation up to an assistant turn, rendered
with the generation prompt, must be a prefix of the conversation through that turn, which must be a
prefix of the whole; the turn is the text between. The pieces between marks are tokenized one by one
and concatenated, so a mark never falls inside a token (a test checks that this equals tokenizing the
whole rendering for SmolLM2). A template that renders earlier turns differently once later turns
follow (some drop past reasoning) cannot be marked this way: preflight names the row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.config import CHAT_FORMATS, ChatData

IGNORE_INDEX = -100
MAX_PROBLEMS = 5  # rows named per kind of problem; the count says how many more


class TemplateError(ValueError):
    """The chat template cannot mark this conversation's assistant turns."""


def column(spec: ChatData, fmt: str) -> str:
    return spec.messages_field or CHAT_FORMATS[fmt]["column"]


def detect_format(spec: ChatData, first_row: dict[str, Any]) -> str | None:
    """The row layout: the config's, or (auto) the first row's; None when the first row has neither column."""
    if spec.format != "auto":
        return spec.format
    for fmt in CHAT_FORMATS:
        if first_row.get(column(spec, fmt)) is not None:
            return fmt
    return None


def messages_of(spec: ChatData, fmt: str, row: dict[str, Any]) -> list[dict[str, str]]:
    """The row's conversation as [{role, content}] with roles system, user, assistant."""
    layout = CHAT_FORMATS[fmt]
    return [{"role": layout["roles"][m[layout["role"]]], "content": m[layout["text"]]} for m in row[column(spec, fmt)]]


def _message_problem(fmt: str, turns: Any) -> str | None:
    """What is wrong with one conversation's shape and order, or None."""
    layout = CHAT_FORMATS[fmt]
    role_key, text_key, roles = layout["role"], layout["text"], layout["roles"]
    if not isinstance(turns, list) or not turns:
        return "the conversation is not a non-empty list of messages"
    names = []
    for i, message in enumerate(turns):
        if not isinstance(message, dict) or role_key not in message or text_key not in message:
            return f"message {i} is not an object with {role_key!r} and {text_key!r}"
        if message[role_key] not in roles:
            return (f"message {i} has unknown {role_key} {message[role_key]!r}; {fmt} roles are "
                    f"{', '.join(roles)}")
        if not isinstance(message[text_key], str):
            return f"message {i}: {text_key} must be a string, got {message[text_key]!r}"
        names.append(roles[message[role_key]])
    if "assistant" not in names:
        return "the conversation has no assistant turn: nothing to train on"
    body = names[1:] if names[0] == "system" else names
    if "system" in body:
        return f"message {names.index('system', 1)}: a system message may only come first"
    for i, role in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            at = i + (len(names) - len(body))
            return f"message {at} is {role}, expected {expected}: turns must alternate user, assistant, starting with user"
    for i, (role, message) in enumerate(zip(names, turns)):
        if role == "assistant" and not message[text_key].strip():
            return f"message {i}: an empty assistant turn"
    return None


def check_rows(rows: list[dict[str, Any]], spec: ChatData, where: str) -> list[str]:
    """Every row's layout, roles and turn order (exit 2 with the rows named, before any worker)."""
    fmt = detect_format(spec, rows[0])
    if fmt is None:
        cols = " or ".join(repr(column(spec, f)) for f in CHAT_FORMATS)
        return [f"{where}: row 0 has no conversation column ({cols}; columns present: {sorted(rows[0])}); "
                "set data.format and data.messages_field"]
    other = [f for f in CHAT_FORMATS if f != fmt and column(spec, f) != column(spec, fmt)]
    found: dict[str, list[str]] = {}
    for index, row in enumerate(rows):
        if any(row.get(column(spec, f)) is not None for f in other):
            found.setdefault("mixed", []).append(
                f"{where}: row {index} has {column(spec, other[0])!r} in a file of {fmt} {column(spec, fmt)!r} rows; "
                "use one layout per file")
            continue
        if row.get(column(spec, fmt)) is None:
            found.setdefault("missing", []).append(
                f"{where}: row {index} has no {column(spec, fmt)!r} column (data.format is {fmt})")
            continue
        problem = _message_problem(fmt, row[column(spec, fmt)])
        if problem:
            found.setdefault(problem.split(":")[0], []).append(f"{where}: row {index}: {problem}")
    problems = []
    for group in found.values():
        problems += group[:MAX_PROBLEMS]
        if len(group) > MAX_PROBLEMS:
            problems.append(f"{where}: ... and {len(group) - MAX_PROBLEMS} more rows like the above")
    return problems


def has_template(spec: ChatData, tokenizer: Any) -> bool:
    return spec.prompt_template is not None or bool(getattr(tokenizer, "chat_template", None))


def render(spec: ChatData, tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                         chat_template=spec.prompt_template)


def trained_turns(spec: ChatData, messages: list[dict[str, str]]) -> list[int]:
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    return turns if spec.train_on == "all_assistant" else turns[-1:]


def spans(spec: ChatData, tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """(the whole rendering, the character span of each trained assistant turn in it)."""
    whole = render(spec, tokenizer, messages, False)
    marks = []
    for i in trained_turns(spec, messages):
        before = render(spec, tokenizer, messages[:i], True)
        through = render(spec, tokenizer, messages[: i + 1], False)
        if not through.startswith(before) or not whole.startswith(through) or len(through) == len(before):
            raise TemplateError(
                f"the chat template does not render message {i} (assistant) as an addition to the turns before it "
                "(the conversation up to it, with the generation prompt, is not a prefix of the conversation through "
                "it); it cannot mark assistant turns: give data.prompt_template a template that renders turns in "
                "order")
        marks.append((len(before), len(through)))
    return whole, marks


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]
    turn_ends: list[int]  # token index just past each trained turn


def tokenize(spec: ChatData, tokenizer: Any, messages: list[dict[str, str]]) -> Tokenized:
    """Token ids and labels: the trained turns' tokens as labels, IGNORE_INDEX elsewhere."""
    whole, marks = spans(spec, tokenizer, messages)
    ids: list[int] = []
    labels: list[int] = []
    ends = []
    at = 0
    for start, stop in [*marks, (len(whole), None)]:
        context = tokenizer(whole[at:start], add_special_tokens=False)["input_ids"] if start > at else []
        ids += context
        labels += [IGNORE_INDEX] * len(context)
        if stop is None:
            break
        turn = tokenizer(whole[start:stop], add_special_tokens=False)["input_ids"]
        ids += turn
        labels += turn
        ends.append(len(ids))
        at = stop
    return Tokenized(ids, labels, ends)


def truncate(tokens: Tokenized, max_len: int) -> tuple[list[int], list[int]]:
    """Cut at the end of the last trained turn that fits whole: no turn is trained without its end-of-turn
    tokens. When not even the first fits, nothing is trained (the example has no target and is dropped)."""
    if len(tokens.input_ids) <= max_len:
        return tokens.input_ids, tokens.labels
    fitting = [end for end in tokens.turn_ends if end <= max_len]
    if not fitting:
        return tokens.input_ids[:max_len], [IGNORE_INDEX] * max_len
    cut = fitting[-1]
    return tokens.input_ids[:cut], tokens.labels[:cut]


def prompt_messages(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """The conversation up to its last assistant turn: what the model is asked to answer in evaluation."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last]


def reply(messages: list[dict[str, str]]) -> str:
    """The last assistant turn: the reference answer in evaluation."""
    return [m for m in messages if m["role"] == "assistant"][-1]["content"]
