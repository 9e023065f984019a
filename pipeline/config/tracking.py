"""`tracking:` and `registry:`: where MLflow runs go, the registered name, and the promotion gate."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.config.base import SAFE_NAME, StrictModel, no_traversal
from pipeline.config.eval import JUDGE_SUITES, SUITES


class TrackingSpec(StrictModel):
    tracking_uri: str = Field("sqlite:///mlruns.db", description="MLflow tracking URI; MLFLOW_TRACKING_URI overrides.")
    experiment_name: str = Field("loraforge", description="MLflow experiment the sweep's runs go into.")
    registered_model_name: str = Field("loraforge-adapter", pattern=SAFE_NAME,
                                       description="Model Registry name for the winner (letters, digits, _ . -).")
    alias: str = Field("candidate", pattern=r"^[A-Za-z0-9_-]+$", description="Alias the winner's version gets.")
    system_metrics_interval_s: float = Field(10.0, ge=0, description=(
        "Seconds between samples of each trial's CPU, RAM, disk, network (and GPU) as MLflow system "
        "metrics (`system/...`); 0: off."))
    outbox_dir: Path | None = Field(None, description=(
        "HTTP servers: where MLflow writes wait while the server is unreachable (default: "
        "<ray.storage_path>/mlflow_outbox; on a cluster, storage every node can write)."))
    outbox_wait_s: float = Field(120.0, ge=0, description=(
        "After the sweep, how long to wait for an unreachable server to take the queued writes before "
        "giving up (they stay in the outbox for `loraforge mlflow sync`)."))

    @field_validator("registered_model_name", "experiment_name")
    @classmethod
    def _names(cls, value: str, info: Any) -> str:
        return no_traversal(value, info.field_name)


class GateCondition(StrictModel):
    """One condition of the promotion gate on an eval-stage metric (`<suite>.<metric>`, e.g. `e2e_nlg.bleu`)."""

    metric: str = Field(pattern=r"^[a-z0-9_]+\.[A-Za-z0-9_.:-]+$",
                        description="`<suite>.<metric>` as the eval stage names it (version tag `eval.<suite>.<metric>`).")
    direction: Literal["higher", "lower"] = Field("higher", description="Which way is better for this metric.")
    min_gain: float | None = Field(None, ge=0, description=(
        "The candidate must beat the champion by at least this much, in the metric's own units."))
    max_drop: float | None = Field(None, ge=0, description=(
        "The candidate may be worse than the champion by at most this much, in the metric's own units."))
    min: float | None = Field(None, description="Absolute floor (applies with or without a champion).")
    max: float | None = Field(None, description="Absolute ceiling (applies with or without a champion).")

    @model_validator(mode="after")
    def _something(self) -> "GateCondition":
        if all(v is None for v in (self.min_gain, self.max_drop, self.min, self.max)):
            raise ValueError(f"gate condition on {self.metric}: give min_gain, max_drop, min or max")
        if self.min_gain is not None and self.max_drop is not None:
            raise ValueError(f"gate condition on {self.metric}: min_gain and max_drop exclude each other; "
                             "write two conditions")
        return self

    @property
    def suite(self) -> str:
        return self.metric.split(".", 1)[0]

    @property
    def name(self) -> str:
        return self.metric.split(".", 1)[1]


class JudgeCalibrationGate(StrictModel):
    """What a gate on judge metrics asks of the judge: a `loraforge judge calibrate` run of this very judge."""

    min_spearman: float | None = Field(None, ge=-1, le=1, description=(
        "The judge's calibration run must show at least this Spearman with its labels (null: any calibration run)."))
    use_lower_bound: bool = Field(False, description="Compare the lower bound of Spearman's 95 % interval, not "
                                  "the point value.")


# suites whose metrics carry bootstrap bounds (`<metric>_low`, `<metric>_high`), and the counts among them that do not
INTERVAL_SUITES = JUDGE_SUITES
COUNT_METRICS = ("items", "scored", "unparseable", "failed")


class PromotionSpec(StrictModel):
    gate: list[GateCondition] = Field(default_factory=list, description=(
        "Conditions the candidate must meet to become champion; all must hold. Without a champion, the "
        "absolute floors (min/max) decide. Judge metrics have interval bounds too, e.g. "
        "`judge_pairwise.win_rate_adjusted_low`."))
    judge_calibration: JudgeCalibrationGate = Field(default_factory=JudgeCalibrationGate, description=(
        "A gate with judge metrics promotes only when the judge that produced them has a calibration run in the "
        "tracking store (`loraforge judge calibrate`), with at least min_spearman when set."))
    from_alias: str = Field("candidate", pattern=r"^[A-Za-z0-9_-]+$", description="The alias promoted (--from).")
    to_alias: str = Field("champion", pattern=r"^[A-Za-z0-9_-]+$", description="The alias moved (--to).")

    @model_validator(mode="after")
    def _suites(self) -> "PromotionSpec":
        unknown = sorted({c.suite for c in self.gate} - set(SUITES))
        if unknown:
            raise ValueError(f"registry.promotion.gate: unknown suite(s) {', '.join(unknown)}; metrics are "
                             f"`<suite>.<metric>` with a suite of {', '.join(SUITES)}")
        for cond in self.gate:
            base, _, bound = cond.name.rpartition("_")
            if bound not in ("low", "high") or not base:
                continue
            if cond.suite not in INTERVAL_SUITES:
                raise ValueError(f"registry.promotion.gate: {cond.metric} names an interval bound, but {cond.suite} "
                                 f"metrics have none (only {', '.join(INTERVAL_SUITES)} do); gate on {cond.suite}."
                                 f"{base} instead")
            if base in COUNT_METRICS:
                raise ValueError(f"registry.promotion.gate: {cond.metric}: {base} is a count, which has no interval; "
                                 "gate on a rate or a mean (e.g. win_rate_adjusted_low, score_mean_low)")
        return self


class RegistrySpec(StrictModel):
    promotion: PromotionSpec = Field(default_factory=PromotionSpec)
