"""`eval:`: the benchmark suites, which fit which data kind, and decoding."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from pipeline.config.base import StrictModel


class GenerationSpec(StrictModel):
    """Decoding settings: greedy (the default), sampling (`do_sample`) or beam search (`num_beams` > 1)."""

    max_new_tokens: int = Field(64, gt=0, description="Tokens generated at most per prompt; stops earlier at EOS.")
    do_sample: bool = Field(False, description="Sample with temperature and top_p instead of greedy/beam decoding.")
    temperature: float = Field(1.0, ge=0, description="Sampling temperature (0: greedy).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling: keep the smallest set of tokens with this mass.")
    num_beams: int = Field(1, ge=1, description="Beam search width (1: no beam search).")
    length_penalty: float = Field(1.0, description="Beam search: exponent on the length in the beam score.")
    no_repeat_ngram_size: int = Field(0, ge=0, description="Never repeat an n-gram of this size (0: off).")
    batch_size: int = Field(8, gt=0, description="Prompts decoded together (left-padded).")
    seed: int = Field(0, description="Seed for sampling.")


JUDGE_SUITES = ("judge_single", "judge_pairwise", "judge_side_by_side")  # graded by the LLM judge (`judge:`)
SUITES = ("classification", "perplexity", "e2e_nlg", "lm_eval", "mt_bench", "replies", *JUDGE_SUITES)
SuiteName = Literal["classification", "perplexity", "e2e_nlg", "lm_eval", "mt_bench", "replies", "judge_single",
                    "judge_pairwise", "judge_side_by_side"]
# which suites fit which data kind; the default list is the first entry's suites
SUITES_FOR_KIND: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # kind: (default suites, allowed suites)
    "classification": (("classification",), ("classification",)),
    "instruction": (("perplexity",), ("perplexity", "lm_eval", "mt_bench", *JUDGE_SUITES)),
    "data_to_text": (("perplexity", "e2e_nlg"), ("perplexity", "e2e_nlg", "lm_eval")),
    "chat": (("perplexity", "replies"), ("perplexity", "replies", "lm_eval", "mt_bench", *JUDGE_SUITES)),
}


class E2eNlgSuiteSpec(StrictModel):
    """`e2e_nlg`: generate one text per meaning representation, score against all its references."""

    max_instances: int | None = Field(None, gt=0, description="Score the first N distinct MRs of the eval split (default: all).")
    generation: GenerationSpec | None = Field(None, description="Decoding for this suite (default: eval.generation).")


class LmEvalSuiteSpec(StrictModel):
    """`lm_eval`: EleutherAI's lm-evaluation-harness on the in-memory model."""

    tasks: list[str] = Field(default_factory=lambda: ["sst2_mc"], min_length=1, description=(
        "Harness task names: the repo's local tasks (pipeline/eval/tasks: sst2_mc, e2e_nlg_gen) or, online, any "
        "harness task."))
    num_fewshot: int | None = Field(None, ge=0, description="Few-shot examples per prompt (default: each task's own).")
    limit: int | None = Field(None, gt=0, description="Items per task at most (default: all).")
    apply_chat_template: bool = Field(False, description="Wrap prompts in the tokenizer's chat template.")
    batch_size: int = Field(8, gt=0, description="Requests the harness batches together.")
    seed: int = Field(0, description="The harness's random, numpy, torch and few-shot seeds.")
    generation: GenerationSpec | None = Field(None, description="Decoding for generation tasks' max_new_tokens "
                                              "(default: each task's own settings).")


class MtBenchSuiteSpec(StrictModel):
    """`mt_bench`: answers to the MT-Bench questions, turn by turn in the chat template (for the judge)."""

    questions_path: Path = Field(Path("mt_bench/question.jsonl"), description=(
        "FastChat's question.jsonl (question_id, category, turns), under the data root or absolute."))
    max_questions: int | None = Field(None, gt=0, description="Answer the first N questions (default: all 80).")
    turns: int = Field(2, ge=1, le=2, description="Turns answered per question; turn 2 sees turn 1 and its answer.")
    generation: GenerationSpec | None = Field(None, description="Decoding for this suite (default: eval.generation).")


class RepliesSuiteSpec(StrictModel):
    """`replies` (data.kind chat): each model's reply to these prompts and to held-out conversations."""

    prompts: list[str] = Field(default_factory=list, description=(
        "User turns, each asked as a new conversation (e.g. \"Who are you?\"); the report shows every model's reply."))
    max_conversations: int = Field(16, ge=0, description=(
        "Held-out conversations asked for their last assistant turn, scored against it by token F1."))
    generation: GenerationSpec | None = Field(None, description="Decoding for this suite (default: eval.generation).")


class EvalSpec(StrictModel):
    enabled: bool = Field(True, description="Evaluate the registered winner, loaded back from the registry.")
    batch_size: int = Field(64, gt=0, description="Examples per forward in the classification and perplexity suites.")
    suites: list[SuiteName] | None = Field(None, description=(
        "Benchmark suites the stage runs after the sweep (default by data.kind: classification; perplexity for "
        "instruction data; perplexity and e2e_nlg for data-to-text; perplexity and replies for chat)."))
    generation: GenerationSpec = Field(default_factory=GenerationSpec)
    e2e_nlg: E2eNlgSuiteSpec = Field(default_factory=E2eNlgSuiteSpec)
    lm_eval: LmEvalSuiteSpec = Field(default_factory=LmEvalSuiteSpec)
    mt_bench: MtBenchSuiteSpec = Field(default_factory=MtBenchSuiteSpec)
    replies: RepliesSuiteSpec = Field(default_factory=RepliesSuiteSpec)
    all_trials: bool = Field(False, description="Also score every finished trial's final adapter with the suites "
                             "(a rank study); the candidate and base are always scored.")
    shards: int = Field(1, gt=0, description="Ray tasks a generation suite's prompts are split over, per model.")
    one_load: bool = Field(True, description=(
        "Score every model (candidate, base, champion, trials) on one base load per shard: the adapters attached "
        "side by side (PEFT), the suite run for each in turn. false: one task and one base load per model."))

    def decoding(self, suite_name: str) -> GenerationSpec:
        """A generation suite's decoding: its own `eval.<suite>.generation`, else `eval.generation`."""
        return getattr(self, suite_name).generation or self.generation
