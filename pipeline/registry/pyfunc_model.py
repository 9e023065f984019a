"""The pyfunc MLflow loads for a registered loraforge adapter: "models from code".

MLflow copies this file into the model and runs it on load; `set_model` at the bottom hands
over the model object, so nothing is pickled or unpickled. The model's artifacts are the
PEFT folder (`artifacts/adapter/`) and the trial's resolved config (`artifacts/config.yaml`);
the base model is not copied: `load_context` loads the one the config names (a folder or a
shipped `pkg:` model) and refuses one whose weights' sha256 differs from the recorded hash.

Input: a DataFrame with the task's input columns as the config names them. Output:
`label` and `probabilities` (classification) or `text` (instruction, data-to-text).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import mlflow.pyfunc
from mlflow.models import set_model


class LoraAdapterModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        import yaml

        from pipeline.config import ExperimentConfig
        from pipeline.eval.stage import load_model
        from pipeline.registry import lineage

        config = ExperimentConfig.model_validate(yaml.safe_load(Path(context.artifacts["config"]).read_text()))
        expected = (context.model_config or {}).get("base_sha256")
        if expected:
            actual = lineage.base_identity(config.model.name_or_path)["sha256"]
            if actual != expected:
                raise ValueError(f"base model {config.model.name_or_path}: weights' sha256 is {actual}, but the adapter "
                                 f"was trained on {expected}; install the base it was trained on")
        with tempfile.TemporaryDirectory() as tmp:
            self.model, self.tokenizer = load_model(config, context.artifacts["adapter"], Path(tmp))
        self.config = config

    def predict(self, context, model_input, params=None):  # no type hints: MLflow would infer a signature from them
        import pandas as pd
        import torch

        from pipeline import data
        from pipeline.config import ClassificationData
        from pipeline.eval.generation import generate

        rows = pd.DataFrame(model_input).to_dict(orient="records")
        spec = self.config.data
        if isinstance(spec, ClassificationData):
            rows = [{**row, spec.label_field: 0} for row in rows]  # tokenize_rows wants a label; it is not used
            examples = data.tokenize_rows(spec, rows, self.tokenizer)
            batch = data.collate(examples, self.tokenizer.pad_token_id)
            with torch.no_grad():
                logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            probabilities = torch.softmax(logits.float(), dim=-1)
            return pd.DataFrame({"label": probabilities.argmax(-1).tolist(), "probabilities": probabilities.tolist()})
        decoding = type(self.config.eval.generation).model_validate(
            {**self.config.eval.generation.model_dump(), **(params or {})})
        if spec.kind == "chat":  # `messages`: the conversation so far, OpenAI roles; the reply is generated
            prompts = [data.reply_prompt_ids(spec, list(row["messages"]), self.tokenizer) for row in rows]
        else:
            prompts = [data.prompt_ids(spec, row, self.tokenizer) for row in rows]
        return pd.DataFrame({"text": generate(self.model, self.tokenizer, prompts, decoding).texts})


set_model(LoraAdapterModel())
