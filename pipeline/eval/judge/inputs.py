"""What the judge reads: questions, FastChat's judge prompts, reference answers, other models' answers.

Every file is checked before any generation; a bad row is named by file and line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import datafiles
from pipeline.config import JudgeSpec
from pipeline.eval.judge import prompts


class InputError(ValueError):
    pass


@dataclass(frozen=True)
class Question:
    question_id: int
    category: str
    turns: tuple[str, ...]


def jsonl_rows(path: Path, field: str) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) of each non-blank line of a JSON Lines file; InputError naming `field`, file and line."""
    if not path.is_file():
        raise InputError(f"{field}: {path} not found")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{field}: {path}:{number}: not JSON ({err.msg}); the file must be JSON Lines") from None
        if not isinstance(row, dict):
            raise InputError(f"{field}: {path}:{number}: expected a JSON object, got {type(row).__name__}")
        rows.append((number, row))
    if not rows:
        raise InputError(f"{field}: {path} has no rows")
    return rows


def _question_id(row: dict[str, Any], where: str) -> int:
    value = row.get("question_id", row.get("id"))
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip().isdigit():
        raise InputError(f"{where}: needs an integer question_id, got {value!r}")
    return int(value)


def load_questions(spec: JudgeSpec) -> list[Question]:
    """MT-Bench's question.jsonl, or any JSONL with question_id and `turns` (list) or `prompt` (string)."""
    field = "judge.questions_path"
    questions, seen = [], set()
    for number, row in jsonl_rows(spec.questions_path, field):
        where = f"{field}: {spec.questions_path}:{number}"
        qid = _question_id(row, where)
        turns = row.get("turns")
        if turns is None:
            text = row.get("prompt", row.get("question", row.get("instruction")))
            turns = [text] if isinstance(text, str) else None
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
            raise InputError(f"{where}: needs `turns` (a list of non-empty strings) or `prompt` (a string)")
        if qid in seen:
            raise InputError(f"{where}: question_id {qid} appears twice")
        seen.add(qid)
        questions.append(Question(qid, str(row.get("category", "")), tuple(turns[: spec.turns])))
    if spec.question_ids is not None:
        missing = sorted(set(spec.question_ids) - seen)
        if missing:
            raise InputError(f"judge.question_ids: {missing} not in {spec.questions_path}")
        wanted = set(spec.question_ids)
        questions = [q for q in questions if q.question_id in wanted]
    return questions[: spec.max_questions]


def load_answers(path: Path, field: str) -> dict[int, list[str]]:
    """question_id -> the turns' answers: FastChat `model_answer` rows (choices[0].turns) or `answer` / `turns`."""
    answers = {}
    for number, row in jsonl_rows(path, field):
        where = f"{field}: {path}:{number}"
        qid = _question_id(row, where)
        if isinstance(row.get("choices"), list) and row["choices"] and isinstance(row["choices"][0], dict):
            turns = row["choices"][0].get("turns")
        elif isinstance(row.get("answer"), str):
            turns = [row["answer"]]
        else:
            turns = row.get("turns")
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
            raise InputError(f"{where}: needs choices[0].turns (FastChat model_answer), `answer` or `turns`")
        answers[qid] = turns
    return answers


def load_references(spec: JudgeSpec) -> dict[int, list[str]]:
    if spec.reference_path is None:
        return {}
    return load_answers(spec.reference_path, "judge.reference_path")


def load_judge_prompts(spec: JudgeSpec) -> dict[str, prompts.JudgePrompt]:
    if not spec.prompts_path.is_file():
        raise InputError(f"judge.prompts_path: {spec.prompts_path} not found")
    try:
        return prompts.load_prompts(spec.prompts_path)
    except prompts.PromptFileError as err:
        raise InputError(f"judge.prompts_path: {err}") from None


def check(spec: JudgeSpec, modes: list[str]) -> list[str]:
    """Every input problem of the judge modes, before any model runs."""
    problems = []
    manifest = datafiles.load_manifest()
    files = [("judge.questions_path", spec.questions_path), ("judge.prompts_path", spec.prompts_path)]
    if spec.reference_path is not None:
        files.append(("judge.reference_path", spec.reference_path))
    for field, path in files:
        problem = datafiles.check_file(path, manifest=manifest)
        if problem:
            problems.append(f"{field}: {problem}")
    if problems:
        return problems
    questions: list[Question] = []
    for load in (lambda: questions.extend(load_questions(spec)), lambda: load_judge_prompts(spec),
                 lambda: load_references(spec)):
        try:
            load()
        except InputError as err:
            problems.append(str(err))
    if "judge_side_by_side" in modes:
        if len(spec.side_by_side) + len(spec.side_by_side_models) < 2:
            problems.append("judge.side_by_side: side-by-side grading needs at least two answers per question "
                            "(judge.side_by_side_models plus judge.side_by_side files)")
        unknown = [m for m in spec.side_by_side_models if m not in ("candidate", "base", "champion")]
        if unknown:
            problems.append(f"judge.side_by_side_models: {unknown} are not candidate, base or champion")
        for i, ref in enumerate(spec.side_by_side):
            try:
                answers = load_answers(ref.path, f"judge.side_by_side[{i}].path")
            except InputError as err:
                problems.append(str(err))
                continue
            lacking = [q.question_id for q in questions if q.question_id not in answers]
            if lacking:
                problems.append(f"judge.side_by_side[{i}].path: {ref.path} has no answer to question_id "
                                f"{lacking[:10]}{' ...' if len(lacking) > 10 else ''}; judge.question_ids can "
                                "restrict the questions to those it answers")
    return problems
