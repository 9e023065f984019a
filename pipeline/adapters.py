"""LoRA adapters: spec -> PEFT `LoraConfig`, target modules checked against the model, attach/save/load.

The update is W = W0 + (alpha/r)·B·A with A Gaussian and B zero at init (PEFT's
default init), so a freshly attached adapter leaves the model's outputs unchanged.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.config import ClassificationData, LoraSpec, ModelSpec

METADATA_FILE = "loraforge.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# PEFT's shorthand for "every linear layer except the output head"
ALL_LINEAR = "all-linear"
# Module types PEFT's LoRA can wrap.
SUPPORTED_TYPES = ("Linear", "Embedding", "Conv1D", "Conv1d", "Conv2d", "Conv3d", "Linear4bit", "Linear8bitLt")


def is_classification(data_spec: Any) -> bool:
    return isinstance(data_spec, ClassificationData)


def auto_model_class(data_spec: Any) -> type:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForSequenceClassification if is_classification(data_spec) else AutoModelForCausalLM


def _model_kwargs(model_spec: ModelSpec, data_spec: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"trust_remote_code": model_spec.trust_remote_code}
    if is_classification(data_spec):
        kwargs["num_labels"] = data_spec.num_labels
    return kwargs


def model_skeleton(model_spec: ModelSpec, data_spec: Any) -> nn.Module:
    """The model's module tree on the meta device: no weights read, no memory used."""
    from transformers import AutoConfig

    kwargs = _model_kwargs(model_spec, data_spec)
    hf_config = AutoConfig.from_pretrained(model_spec.resolve(), **kwargs)
    with torch.device("meta"):
        return auto_model_class(data_spec).from_config(hf_config, trust_remote_code=model_spec.trust_remote_code)


def load_base_model(model_spec: ModelSpec, data_spec: Any, dtype: torch.dtype = torch.float32,
                    **kwargs: Any) -> nn.Module:
    """The pretrained base from a local folder, safetensors only (never unpickles a `.bin`).

    Extra keyword arguments go to `from_pretrained` (a `quantization_config` for QLoRA).
    """
    return auto_model_class(data_spec).from_pretrained(
        model_spec.resolve(), dtype=dtype, use_safetensors=True, **_model_kwargs(model_spec, data_spec), **kwargs
    )


# BERT's feed-forward output is `layer.<i>.output.dense`, whose suffix `output.dense` the attention's
# `attention.output.dense` shares: the mlp preset is a regular expression (PEFT full-matches a string target)
_BERT_MLP = r".*\.layer\.\d+\.(intermediate|output)\.dense"
_BERT = {"attention_qv": ["query", "value"], "attention_all": ["query", "key", "value", "attention.output.dense"],
         "attention_mlp": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
         "mlp": _BERT_MLP}
_LLAMA = {"attention_qv": ["q_proj", "v_proj"], "attention_all": ["q_proj", "k_proj", "v_proj", "o_proj"],
          "attention_mlp": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
          "mlp": ["gate_proj", "up_proj", "down_proj"]}
_OPT = {"attention_qv": ["q_proj", "v_proj"], "attention_all": ["q_proj", "k_proj", "v_proj", "out_proj"],
        "attention_mlp": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"], "mlp": ["fc1", "fc2"]}
# model_type -> preset -> module-name suffixes (GPT-2 fuses q, k, v into c_attn), or one regular expression
TARGET_PRESETS: dict[str, dict[str, list[str] | str]] = {
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "electra"), _BERT),
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3"), _LLAMA),
    "opt": _OPT,
    "distilbert": {"attention_qv": ["q_lin", "v_lin"], "attention_all": ["q_lin", "k_lin", "v_lin", "out_lin"],
                   "attention_mlp": ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"], "mlp": ["lin1", "lin2"]},
    "gpt2": {"attention_qv": ["c_attn"], "attention_all": ["c_attn", "attn.c_proj"],
             "attention_mlp": ["c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"], "mlp": ["mlp.c_fc", "mlp.c_proj"]},
}


def resolve_targets(targets: list[str] | str, model_type: str) -> list[str] | str:
    """A preset name -> this architecture's module names (or a regular expression PEFT full-matches);
    `all_linear` or `[all-linear]` -> PEFT's "all-linear"."""
    if not isinstance(targets, str):
        return ALL_LINEAR if list(targets) == [ALL_LINEAR] else list(targets)
    if targets == "all_linear":
        return ALL_LINEAR
    presets = TARGET_PRESETS.get(model_type)
    if presets is None or targets not in presets:
        raise ValueError(
            f"lora.target_modules: preset {targets!r} is not defined for model type {model_type!r} "
            f"(known: {', '.join(sorted(TARGET_PRESETS))}); list module names instead"
        )
    resolved = presets[targets]
    return resolved if isinstance(resolved, str) else list(resolved)


def _matches(module_name: str, target: str) -> bool:
    # PEFT's rule for a list of targets: exact name or a dotted suffix of it
    return module_name == target or module_name.endswith("." + target)


def targets_match(module_name: str, targets: list[str] | str) -> bool:
    """Whether resolved targets (a list of suffixes, all-linear, or a regular expression) take this module."""
    import re

    if targets == ALL_LINEAR:
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, module_name) is not None
    return any(_matches(module_name, t) for t in targets)


def head_modules(model: nn.Module) -> list[str]:
    """Modules a classification checkpoint lacks and must train in full: classifier/score and pooler."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name.count(".") <= 1}
    return [name for name in ("classifier", "score", "pooler") if name in names]


def linear_leaves(model: nn.Module) -> list[str]:
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear) or
                   type(m).__name__ in ("Conv1D", "Linear4bit", "Linear8bitLt")})


def check_target_modules(model: nn.Module, targets: list[str] | str, where: str = "lora.target_modules") -> list[str]:
    """One problem per target that matches no module or only modules LoRA cannot wrap, with close matches
    (a string other than all-linear is a regular expression, full-matched as PEFT does)."""
    modules = dict(model.named_modules())
    if isinstance(targets, str) and targets != ALL_LINEAR:
        if not any(targets_match(name, targets) for name in modules):
            return [f"{where}: the pattern {targets!r} matches no module of the model (linear layers: "
                    f"{', '.join(linear_leaves(model))})"]
        return []
    targets = [targets] if isinstance(targets, str) else targets
    if targets == [ALL_LINEAR]:
        return []  # PEFT resolves it to every linear layer but the output head
    if ALL_LINEAR in targets:
        return [f"{where}: {ALL_LINEAR!r} stands alone; give it as the only entry or list module names"]
    suffixes = sorted({".".join(name.split(".")[-k:]) for name in modules if name for k in (1, 2, 3)})
    problems = []
    for target in targets:
        hits = [name for name in modules if _matches(name, target)]
        if not hits:
            close = difflib.get_close_matches(target, suffixes, n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            problems.append(f"{where}: {target!r} matches no module of the model{hint} (linear layers: "
                            f"{', '.join(linear_leaves(model))})")
            continue
        unsupported = sorted({type(modules[h]).__name__ for h in hits} - set(SUPPORTED_TYPES))
        if unsupported and all(type(modules[h]).__name__ in unsupported for h in hits):
            problems.append(
                f"{where}: {target!r} matches only {', '.join(unsupported)} modules, which LoRA cannot wrap; "
                "target Linear layers instead"
            )
    return problems


def lora_config(lora_spec: LoraSpec, data_spec: Any, modules_to_save: list[str] | None, model_type: str) -> Any:
    from peft import EvaConfig, LoraConfig, TaskType

    targets = resolve_targets(lora_spec.target_modules, model_type)
    return LoraConfig(
        r=lora_spec.r,
        lora_alpha=lora_spec.effective_alpha,
        lora_dropout=lora_spec.dropout,
        target_modules=targets,
        modules_to_save=modules_to_save,
        use_rslora=lora_spec.use_rslora,
        use_dora=lora_spec.use_dora,
        init_lora_weights=True if lora_spec.init == "default" else lora_spec.init,
        # rho 1: every layer keeps rank r (EVA may otherwise move rank between layers), so a checkpoint's shapes
        # are the config's and a resumed run rebuilds the same model
        eva_config=EvaConfig(rho=1.0) if lora_spec.init == "eva" else None,
        task_type=TaskType.SEQ_CLS if is_classification(data_spec) else TaskType.CAUSAL_LM,
    )


def attach_lora(base_model: nn.Module, lora_spec: LoraSpec, data_spec: Any) -> nn.Module:
    """Wrap `base_model` with LoRA; only the adapters (and the task head for classification) train.

    An init that rewrites the base (pissa, olora) keeps its starting A and B on the model, so that
    `save_adapter` can write an adapter for the original base."""
    from peft import get_peft_model

    model_type = getattr(base_model.config, "model_type", "")
    model = get_peft_model(base_model, lora_config(lora_spec, data_spec, modules_to_save(base_model, lora_spec, data_spec),
                                                   model_type))
    if lora_spec.rewrites_base:
        model.loraforge_initial = {k: v.detach().clone() for k, v in get_peft_state(model).items()}
    return model


def eva_init(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> None:
    """`lora.init: eva`: A from the SVD of each adapted layer's inputs on these training batches (PEFT)."""
    from peft import initialize_lora_eva_weights

    initialize_lora_eva_weights(unwrap(model), dataloader=batches, show_progress_bar=False)


def modules_to_save(base_model: nn.Module, lora_spec: LoraSpec, data_spec: Any) -> list[str] | None:
    """Modules trained in full beside the adapter: `lora.modules_to_save`, else a classifier's head and pooler."""
    if lora_spec.modules_to_save is None and is_classification(data_spec):
        # The base checkpoint has no trained head (and MiniLM no trained pooler), so
        # both train in full and are saved with the adapter; otherwise a user loading
        # the adapter would get a freshly random head.
        return head_modules(base_model)
    return lora_spec.modules_to_save


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def unwrap(model: nn.Module) -> nn.Module:
    """The PEFT model inside a DDP wrapper, if any."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def save_adapter(model: nn.Module, adapter_dir: Path, metadata: dict[str, Any]) -> Path:
    """A standard PEFT folder (adapter_config.json + adapter_model.safetensors) plus loraforge.json.

    After an init that rewrote the base (pissa, olora) the folder holds PEFT's conversion, a rank-2r
    adapter for the original base, and RESIDUAL_WEIGHTS the trained tensors as they sit on the rewritten
    base (what a resumed run loads)."""
    adapter_dir = Path(adapter_dir)
    adapter_dir.mkdir(parents=True, exist_ok=True)
    peft_model = unwrap(model)
    initial = getattr(peft_model, "loraforge_initial", None)
    if initial is None:
        peft_model.save_pretrained(str(adapter_dir), safe_serialization=True)
    else:
        import tempfile

        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous().cpu() for k, v in get_peft_state(peft_model).items()},
                  str(adapter_dir / RESIDUAL_WEIGHTS))
        with tempfile.TemporaryDirectory() as tmp:
            _save_initial(initial, Path(tmp) / "initial")
            peft_model.save_pretrained(str(adapter_dir), safe_serialization=True,
                                       path_initial_model_for_weight_conversion=str(Path(tmp) / "initial"))
    (adapter_dir / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True))
    return adapter_dir


# the trained tensors of an adapter whose init rewrote the base, relative to that rewritten base
RESIDUAL_WEIGHTS = "adapter_residual.safetensors"


def get_peft_state(model: nn.Module) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(unwrap(model))


def _save_initial(initial: dict[str, torch.Tensor], folder: Path) -> None:
    """The adapter as initialized, where PEFT's weight conversion reads it (PEFT writes its config beside it)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().cpu() for k, v in initial.items()}, str(folder / ADAPTER_WEIGHTS))


def load_adapter_weights(model: nn.Module, adapter_dir: Path) -> None:
    """Put a saved adapter's tensors (LoRA + modules_to_save) back into a PEFT model with the same config
    (after a base-rewriting init: the tensors relative to the rewritten base)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    residual = Path(adapter_dir) / RESIDUAL_WEIGHTS
    weights = residual if residual.is_file() else Path(adapter_dir) / ADAPTER_WEIGHTS
    result = set_peft_model_state_dict(unwrap(model), load_file(str(weights)))
    missing = [k for k in result.missing_keys if "lora_" in k or "modules_to_save" in k]
    if missing:
        raise ValueError(f"adapter in {adapter_dir} lacks {len(missing)} trained tensors, e.g. {missing[0]}")


def read_metadata(adapter_dir: Path) -> dict[str, Any]:
    return json.loads((Path(adapter_dir) / METADATA_FILE).read_text())


def load_adapter_model(adapter_dir: Path, model_spec: ModelSpec, data_spec: Any, base: nn.Module | None = None) -> nn.Module:
    """Base + adapter the way a user would: `PeftModel.from_pretrained(base, adapter_dir)`.

    `base` defaults to the full-precision pretrained model; QLoRA adapters pass the
    4-bit base they were trained against.
    """
    from peft import PeftModel

    if base is None:
        base = load_base_model(model_spec, data_spec)
    return PeftModel.from_pretrained(base, str(adapter_dir))


def load_tokenizer(model_spec: ModelSpec, data_spec: Any) -> Any:
    """The base model's tokenizer; causal LMs without a pad token pad with EOS (labels mask padding)."""
    import logging

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_spec.resolve(), trust_remote_code=model_spec.trust_remote_code)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"model.name_or_path: tokenizer of {model_spec.resolve()} has neither a pad nor an EOS token")
        logging.getLogger(__name__).info("tokenizer has no pad token: padding with EOS %r", tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
