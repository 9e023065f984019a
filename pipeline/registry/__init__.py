"""The Model Registry side of loraforge: what a registered version is and how it moves.

- `lineage`: where a version came from (base model and its hash, datasets, code, library versions);
- `mlflow_model`: each winner as an MLflow Model (pyfunc, models from code) with the PEFT folder inside;
- `pyfunc_model`: the file MLflow loads for that model (never unpickled);
- `promotion`: the eval-gated move of `champion`, its override and its rollback;
- `tables`: `loraforge models` and `loraforge runs`.
"""
