"""loraforge: LoRA / QLoRA fine-tuning sweeps on Ray, tracked in MLflow.

Stages, one module each: config -> data -> adapters/strategies -> train -> sweep
-> tracking -> evaluate; `pipeline.run.run_pipeline` chains them and `cli` is
the `loraforge` command.
"""

__version__ = "0.1.0"
