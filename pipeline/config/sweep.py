"""`sweep:`: the search space, searcher, scheduler and packing."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, model_validator

from pipeline.config.base import StrictModel


DOMAIN_KINDS = ("grid", "choice", "uniform", "loguniform", "randint", "pow2")


class ParamDomain(StrictModel):
    """One sweep dimension: exactly one of grid / choice / uniform / loguniform / randint / pow2."""

    grid: list[Any] | None = None
    choice: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None
    pow2: tuple[int, int] | None = Field(
        None, description="Every power of two in [lo, hi], e.g. ranks [1, 1024]: a grid for searcher grid, a choice otherwise."
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> "ParamDomain":
        given = [name for name in DOMAIN_KINDS if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of " + ", ".join(DOMAIN_KINDS))
        kind = given[0]
        if kind in ("grid", "choice") and not getattr(self, kind):
            raise ValueError(f"{kind} must list at least one value")
        if kind in ("uniform", "loguniform", "randint"):
            low, high = getattr(self, kind)
            if not low < high:
                raise ValueError(f"{kind} lower bound must be < upper bound, got [{low}, {high}]")
            if kind == "loguniform" and low <= 0:
                raise ValueError(f"loguniform bounds must be > 0, got [{low}, {high}]")
        if kind == "pow2":
            low, high = self.pow2
            if not 1 <= low <= high:
                raise ValueError(f"pow2 bounds must satisfy 1 <= lo <= hi, got [{low}, {high}]")
        return self

    @property
    def kind(self) -> str:
        return next(n for n in DOMAIN_KINDS if getattr(self, n) is not None)

    def values(self) -> list[Any]:
        """Every value a finite domain can take; bounds for continuous ones."""
        if self.kind == "pow2":
            low, high = self.pow2
            return [2**k for k in range(math.ceil(math.log2(low)), math.floor(math.log2(high)) + 1)]
        return list(getattr(self, self.kind))


class AshaSpec(StrictModel):
    grace_period: int = Field(1, gt=0, description="Evaluations a trial always gets before it can be stopped.")
    reduction_factor: float = Field(2.0, gt=1, description="Keep the top 1/reduction_factor at each rung.")


class PbtSpec(StrictModel):
    perturbation_interval: int = Field(
        2, gt=0, description="Evaluations between two exploit/explore decisions of a trial.")
    quantile_fraction: float = Field(
        0.25, gt=0, le=0.5, description="The bottom fraction of trials copies a trial of the top fraction.")
    resample_probability: float = Field(
        0.25, ge=0, le=1, description="Explore: chance of drawing train.lr anew from its domain instead of "
        "scaling the copied one by 0.8 or 1.2 (or moving one step along a grid).")


class SweepSpec(StrictModel):
    searcher: Literal["grid", "random", "optuna"] = Field(
        "grid", description="How configs are chosen: every grid point, seeded random draws, or Optuna's TPE.")
    scheduler: Literal["asha", "median", "fifo", "pbt"] = Field(
        "asha", description="asha: successive halving; median: stop trials below the median of others at the same "
        "evaluation; fifo: run every trial to the end; pbt: population based training of train.lr (the worst "
        "trials continue from a copy of a better trial's checkpoint with a perturbed learning rate)."
    )
    median_min_samples: int = Field(2, gt=0, description="median: trials needed at an evaluation before any is stopped.")
    metric: str = Field("eval_accuracy", description="Reported metric the sweep optimizes.")
    mode: Literal["max", "min"] = Field("max", description="Whether a higher or a lower sweep.metric is better.")
    num_samples: int = Field(1, gt=0, description="Samples per grid point (grid/random) or trials (optuna).")
    grid_order: Literal["listed", "shuffled"] = Field(
        "listed", description="grid: run the grid points in Tune's order (the first parameter varies fastest) "
        "or in a random order seeded by train.seed. Early stopping judges each trial against those that reached "
        "an evaluation before it, so a grid listed from weak to strong configs wastes it."
    )
    parameters: dict[str, ParamDomain] = Field(
        default_factory=dict,
        description="Dotted config path -> domain, e.g. `lora.r: {grid: [2, 8]}`.",
    )
    asha: AshaSpec = Field(default_factory=AshaSpec)
    pbt: PbtSpec = Field(default_factory=PbtSpec)
    max_concurrent_trials: int | None = Field(
        None, gt=0, description="Default: as many as the cluster's CPUs/GPUs hold at once."
    )
    max_trials: int = Field(64, gt=0, description="Refuse sweeps with more trials than this.")
    time_budget_s: float | None = Field(
        None, gt=0, description="Stop the sweep after this many seconds; the best checkpoint so far wins."
    )
    pack_memory_gib: float | None = Field(
        None, gt=0, description="Memory one pack may use on its device (default: its share of the node's RAM on "
        "CPUs, 90 % of the GPU when the driver sees one); the planner packs configs up to it."
    )
    pack_size: int | Literal["auto"] = Field(
        "auto", description="Configs trained together on one frozen base in one trial (pipeline.pack): k, or auto "
        "(as many compatible configs as the memory planner fits; 1 where the sweep cannot pack: scheduler median "
        "or pbt, searcher optuna, ZeRO-3, multi-worker trials). 1: one trial per config. In a pack, asha becomes "
        "successive halving inside the pack at equal step budgets; fifo trains every config to the end."
    )

    @model_validator(mode="after")
    def _searcher_domains(self) -> "SweepSpec":
        for path, domain in self.parameters.items():
            if self.searcher == "grid" and domain.kind not in ("grid", "pow2"):
                raise ValueError(
                    f"sweep.parameters.{path}: searcher 'grid' takes only `grid:` or `pow2:`, got `{domain.kind}:` "
                    "(use searcher: random or optuna for sampled domains)"
                )
            if self.searcher == "optuna" and domain.kind == "grid":
                raise ValueError(
                    f"sweep.parameters.{path}: searcher 'optuna' cannot take `grid:`; use `choice:` instead"
                )
        if isinstance(self.pack_size, int) and self.pack_size < 1:
            raise ValueError(f"sweep.pack_size: {self.pack_size} is below 1; give a number of configs >= 1, or auto")
        if self.pack_size not in (1, "auto"):
            if self.scheduler in ("median", "pbt"):
                raise ValueError(f"sweep.pack_size: {self.pack_size} with scheduler {self.scheduler}, which cannot "
                                 "judge configs inside a pack yet; set pack_size: 1 (or auto), or scheduler asha/fifo")
            if self.searcher == "optuna":
                raise ValueError(f"sweep.pack_size: {self.pack_size} with searcher optuna, which proposes configs one "
                                 "at a time from earlier results; set pack_size: 1 (or auto), or searcher grid/random")
        if self.scheduler == "pbt":
            if "train.lr" not in self.parameters:
                raise ValueError("sweep.scheduler: pbt explores train.lr; add its domain to sweep.parameters "
                                 "(e.g. `train.lr: {loguniform: [1.0e-4, 1.0e-2]}` or a grid)")
            if self.parameters["train.lr"].kind not in ("grid", "choice", "uniform", "loguniform"):
                raise ValueError("sweep.parameters.train.lr: pbt needs a grid, choice, uniform or loguniform domain")
            if self.searcher == "optuna":
                raise ValueError("sweep.searcher: optuna cannot run under scheduler pbt (PBT changes a trial's "
                                 "config mid-run); use grid or random")
            if self.trial_count() < 2:
                raise ValueError(f"sweep.scheduler: pbt needs a population of at least 2 trials, the sweep has "
                                 f"{self.trial_count()}; raise sweep.num_samples or add grid values")
        return self

    def trial_count(self) -> int:
        grid_points = 1
        for domain in self.parameters.values():
            if domain.kind == "grid" or (domain.kind == "pow2" and self.searcher == "grid"):
                grid_points *= len(domain.values())
        return grid_points * self.num_samples
