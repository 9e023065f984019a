"""The benchmark suites by name, and which of them a config runs.

Every suite module imports `pipeline.eval.suite` (the protocol and its helpers); this module
imports every suite, so the lookup sits above them all and nothing below it imports it back.
The judge modes (`judge_single`, `judge_pairwise`, `judge_side_by_side`) are not suites of this
kind: `pipeline.eval.judge.stage` runs them.
"""

from __future__ import annotations

from pipeline.config import SUITES, SUITES_FOR_KIND, ConfigError, ExperimentConfig
from pipeline.eval import classification, e2e_nlg, harness, mt_bench, perplexity, replies
from pipeline.eval.suite import Suite

NAMES = SUITES


def get(name: str) -> Suite:
    """The suite called `name` (a judge mode is not one: see pipeline.eval.judge.stage)."""
    match name:
        case "classification":
            return classification.SUITE
        case "perplexity":
            return perplexity.SUITE
        case "e2e_nlg":
            return e2e_nlg.SUITE
        case "lm_eval":
            return harness.SUITE
        case "mt_bench":
            return mt_bench.SUITE
        case "replies":
            return replies.SUITE
    raise KeyError(f"no benchmark suite named {name!r} (suites: {', '.join(NAMES)})")


def suite_names(config: ExperimentConfig, requested: list[str] | None = None) -> list[str]:
    """The suites to run: `requested` (--suite), else `eval.suites`, else the default for data.kind."""
    default, allowed = SUITES_FOR_KIND[config.data.kind]
    names = list(requested) if requested else (config.eval.suites if config.eval.suites is not None else list(default))
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        raise ConfigError([f"--suite: unknown suite {n!r}; use one of {', '.join(NAMES)}" for n in unknown])
    wrong = [n for n in names if n not in allowed]
    if wrong:
        raise ConfigError([f"eval.suites: {n} cannot score data.kind {config.data.kind} (it takes "
                           f"{', '.join(allowed)})" for n in wrong])
    return names
