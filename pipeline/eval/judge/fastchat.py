"""FastChat-compatible files: `model_answer/<model>.jsonl` and `model_judgment/<judge>_{single,pair}.jsonl`.

Laid out as FastChat's `data/mt_bench/`, so `python show_result.py --judge-model <judge>` (with
`--bench-name` pointing at the folder) reads them. Unscored items get FastChat's -1 score and
"error" winner, which show_result drops.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from pathlib import Path
from typing import Any


def judge_file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "judge"


def write(out: Path, judge_name: str, questions_answers: dict[str, dict[int, list[str]]],
          items: list[dict[str, Any]]) -> list[Path]:
    """Write the answers and the single/pairwise judgments under `out` (FastChat's data/<bench>/ layout)."""
    stamp = time.time()
    written = []
    answers_dir = out / "model_answer"
    answers_dir.mkdir(parents=True, exist_ok=True)
    for model, by_question in questions_answers.items():
        path = answers_dir / f"{judge_file_name(model)}.jsonl"
        with path.open("w") as f:
            for qid, turns in sorted(by_question.items()):
                f.write(json.dumps({"question_id": qid, "answer_id": uuid.uuid5(uuid.NAMESPACE_URL, f"{model}/{qid}").hex,
                                    "model_id": model, "choices": [{"index": 0, "turns": turns}], "tstamp": stamp}) + "\n")
        written.append(path)
    judgments = out / "model_judgment"
    judgments.mkdir(parents=True, exist_ok=True)
    single = [it for it in items if it["mode"] == "single"]
    if single:
        path = judgments / f"{judge_file_name(judge_name)}_single.jsonl"
        with path.open("w") as f:
            for it in single:
                f.write(json.dumps({"question_id": it["question_id"], "model": it["model"],
                                    "judge": [judge_name, it["judge_prompt"]], "user_prompt": it.get("user_prompt", ""),
                                    "judgment": it.get("judgment", "$ERROR$"),
                                    "score": it["score"] if it["status"] == "scored" else -1, "turn": it["turn"],
                                    "tstamp": stamp}) + "\n")
        written.append(path)
    pairs = [it for it in items if it["mode"] == "pairwise"]
    if pairs:
        path = judgments / f"{judge_file_name(judge_name)}_pair.jsonl"
        with path.open("w") as f:
            for it in pairs:
                names = {"candidate": "model_1", it["opponent"]: "model_2", "tie": "tie"}
                f.write(json.dumps({"question_id": it["question_id"], "model_1": "candidate", "model_2": it["opponent"],
                                    "g1_winner": names.get(it["g1_winner"], "error"),
                                    "g2_winner": names.get(it["g2_winner"], "error"),
                                    "judge": [judge_name, it["judge_prompt"]],
                                    "g1_user_prompt": it["g1"].get("user_prompt", ""),
                                    "g1_judgment": it["g1"].get("judgment", "$ERROR$"),
                                    "g2_user_prompt": it["g2"].get("user_prompt", ""),
                                    "g2_judgment": it["g2"].get("judgment", "$ERROR$"),
                                    "turn": it["turn"], "tstamp": stamp}) + "\n")
        written.append(path)
    return written
