"""Each winner as an MLflow Model: pyfunc from code, the PEFT folder inside, the base referenced by hash.

A registered version's files (`models:/NAME/N`):

    MLmodel, python_model.py (pipeline/registry/pyfunc_model.py), requirements.txt, ...
    artifacts/adapter/   the plain PEFT folder (adapter_config.json, adapter_model.safetensors, loraforge.json)
    artifacts/config.yaml  the trial's resolved config (secrets masked)

The model is an MLflow 3 logged model attached to the winning trial's run (so the UI links
model, run, metrics and datasets) and registered from there. Versions registered before
this change are a bare PEFT folder; `adapter_dir` finds the adapter in either.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import yaml

from pipeline import chat, data, redact, tracking
from pipeline.tracking import ADAPTER_SUBPATH
from pipeline.tracking_server import MODEL_DESCRIPTION
from pipeline.config import ChatData, ClassificationData, ExperimentConfig, InstructionData

MODEL_NAME = "model"
CODE_FILE = Path(__file__).with_name("pyfunc_model.py")
REQUIREMENTS = ("mlflow", "torch", "transformers", "peft", "safetensors", "accelerate", "pydantic", "pyyaml", "pandas",
                "bitsandbytes")


def input_columns(config: ExperimentConfig) -> list[tuple[str, bool]]:
    """(column, required) of the model's input DataFrame, named as the config names the data's fields."""
    spec = config.data
    if isinstance(spec, ClassificationData):
        return [(spec.text_field, True)] + ([(spec.text_pair_field, True)] if spec.text_pair_field else [])
    if isinstance(spec, ChatData):
        return [("messages", True)]
    if isinstance(spec, InstructionData):
        return [(spec.instruction_field, True)] + ([(spec.input_field, False)] if spec.input_field else [])
    return [(spec.source_field, True)]


def signature(config: ExperimentConfig) -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema

    if config.data.kind == "chat":
        from mlflow.types.schema import Object, Property

        message = Object([Property("role", "string"), Property("content", "string")])
        inputs = Schema([ColSpec(Array(message), "messages")])
    else:
        inputs = Schema([ColSpec("string", name, required=required) for name, required in input_columns(config)])
    if isinstance(config.data, ClassificationData):
        return ModelSignature(inputs, Schema([ColSpec("long", "label"), ColSpec(Array("double"), "probabilities")]))
    decoding = config.eval.generation
    params = ParamSchema([ParamSpec("max_new_tokens", "long", decoding.max_new_tokens),
                          ParamSpec("do_sample", "boolean", decoding.do_sample),
                          ParamSpec("temperature", "double", decoding.temperature)])
    return ModelSignature(inputs, Schema([ColSpec("string", "text")]), params)


def input_example(config: ExperimentConfig, rows: list[dict[str, Any]]) -> Any:
    import pandas as pd

    spec = config.data
    if isinstance(spec, ChatData):  # each conversation up to its last assistant turn: the model writes that turn
        return pd.DataFrame({"messages": [chat.prompt_messages(data.conversation(spec, row)) for row in rows[:2]]})

    return pd.DataFrame([{name: str(row.get(name) or "") for name, _ in input_columns(config)} for row in rows[:2]])


def requirements() -> list[str]:
    import importlib.metadata

    pins = []
    for name in REQUIREMENTS:
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    # the pyfunc imports loraforge itself (the base model's loading, prompts, decoding)
    return pins + ["loraforge"]


def log_model(config: ExperimentConfig, run_id: str, adapter: Path, base: dict[str, str],
              example_rows: list[dict[str, Any]], tracking_uri: str) -> Any:
    """Log the adapter as an MLflow Model on `run_id` (the winning trial's run); returns its ModelInfo."""
    import mlflow
    from mlflow.models import Model

    with tempfile.TemporaryDirectory() as tmp:
        config_file = Path(tmp) / "config.yaml"
        config_file.write_text(yaml.safe_dump(redact.redact(config.model_dump(mode="json")), sort_keys=False))
        # the logged model belongs to the trial run's experiment (MLflow takes it from the process)
        experiment_id = tracking.client(tracking_uri).get_run(run_id).info.experiment_id
        with tracking.process_uri(tracking_uri, experiment_id):
            # Model.log is what mlflow.pyfunc.log_model calls; it takes the run to attach the model to
            # without starting that (finished) run again
            return Model.log(
                artifact_path=None, name=MODEL_NAME, flavor=mlflow.pyfunc, flavor_name="pyfunc.ModelFromCode",
                python_model=str(CODE_FILE), run_id=run_id,
                artifacts={"adapter": str(adapter), "config": str(config_file)},
                model_config={"base_name": base["name"], "base_sha256": base["sha256"], "task": config.data.kind},
                signature=signature(config), input_example=input_example(config, example_rows),
                # listed, not inferred: inferring loads the model in a subprocess. MLflow still loads it
                # once here to check that the input example serves (a warning if not)
                pip_requirements=requirements(),
                tags={"loraforge.base.sha256": base["sha256"], "loraforge.task": config.data.kind},
            )


def register(mlflow_client: Any, model_name: str, model_info: Any, run_id: str, alias: str, tags: dict[str, str],
             description: str) -> Any:
    """A new version of `model_name` from the logged model, with its lineage tags; `alias` points at it."""
    from mlflow.exceptions import MlflowException

    try:
        mlflow_client.create_registered_model(model_name, description=MODEL_DESCRIPTION)
    except MlflowException as err:
        if "RESOURCE_ALREADY_EXISTS" not in str(err.error_code):
            raise
    # the store resolves `models:/m-<id>` through the process's tracking URI
    with tracking.process_uri(mlflow_client.tracking_uri):
        version = mlflow_client.create_model_version(
            model_name, source=model_info.model_uri, run_id=run_id, tags=redact.redact(tags),
            description=description, model_id=model_info.model_id,
        )
    mlflow_client.set_registered_model_alias(model_name, alias, version.version)
    return version


def describe(config: ExperimentConfig, base: dict[str, str], metric: str, value: float) -> str:
    return (f"{config.name}: LoRA r={config.lora.r} alpha={config.lora.alpha} on "
            f"{json.dumps(config.lora.target_modules)} of {base['name']} ({config.strategy.kind}); "
            f"{metric}={value:.4f}. PEFT folder at `{ADAPTER_SUBPATH}`.")
