"""`lm_eval`: EleutherAI's lm-evaluation-harness, driven in process on the in-memory model.

`simple_evaluate` gets an `HFLM` wrapped around the (PEFT) model and tokenizer already
loaded, so the adapter is scored as it is, without a merge or a save. The repo's own task
YAMLs (`pipeline/eval/tasks/`) read local files from the data root; a task name that is
not one of them is looked up among the harness's built-in tasks (these download their
data, so they need a machine online). The harness's results JSON, with its logged
samples, is kept as an artifact for lm-eval's own tools.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from pipeline.config import ExperimentConfig
from pipeline.datafiles import data_root
from pipeline.eval.suite import metric_name

TASKS_DIR = Path(__file__).parent / "tasks"
ROOT_TOKEN = "${LORAFORGE_DATA_ROOT}"


def local_tasks() -> list[str]:
    return sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))


def render_tasks(out_dir: Path) -> Path:
    """The repo's task YAMLs with the data root filled in, in `out_dir` (the harness's include path)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    root = str(data_root().resolve())
    for path in TASKS_DIR.glob("*.yaml"):
        (out_dir / path.name).write_text(path.read_text().replace(ROOT_TOKEN, root))
    return out_dir


def task_manager(include_dir: Path, tasks: list[str]) -> Any:
    from lm_eval.tasks import TaskManager

    # indexing the harness's 14k built-in tasks takes seconds: only when a task needs it
    builtin = any(task not in local_tasks() for task in tasks)
    return TaskManager(include_path=str(include_dir), include_defaults=builtin)


class HarnessSuite:
    name = "lm_eval"
    shardable = False  # the harness batches and orders its own requests

    def check(self, config: ExperimentConfig) -> list[str]:
        try:
            import lm_eval  # noqa: F401
        except ImportError:
            return ["eval.suites: lm_eval needs lm-evaluation-harness: pip install 'lm_eval[hf]>=0.4.9,<0.5' "
                    "(or drop lm_eval from the suites)"]
        tasks = config.eval.lm_eval.tasks
        with tempfile.TemporaryDirectory() as tmp:
            known = set(task_manager(render_tasks(Path(tmp)), tasks).all_tasks)
        missing = [t for t in tasks if t not in known]
        return [f"eval.lm_eval.tasks: no harness task {t!r} (local tasks: {', '.join(local_tasks())}; "
                "or any task `lm_eval ls tasks` lists)" for t in missing]

    def items(self, config: ExperimentConfig) -> list[dict[str, Any]]:
        return [{"id": "harness"}]  # the harness picks its own items

    def outputs(self, config: ExperimentConfig, model: Any, tokenizer: Any, items: list[dict[str, Any]],
                progress: Any) -> dict[str, Any]:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.utils import handle_non_serializable

        spec = config.eval.lm_eval
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=spec.batch_size,
                  max_length=getattr(model.config, "max_position_embeddings", None))
        gen_kwargs = None
        if spec.generation is not None:
            gen = spec.generation
            gen_kwargs = {"max_gen_toks": gen.max_new_tokens, "do_sample": gen.do_sample,
                          **({"temperature": gen.temperature, "top_p": gen.top_p} if gen.do_sample else {})}
        with tempfile.TemporaryDirectory() as tmp:
            results = lm_eval.simple_evaluate(
                model=lm, tasks=list(spec.tasks), num_fewshot=spec.num_fewshot, limit=spec.limit,
                apply_chat_template=spec.apply_chat_template, log_samples=True, gen_kwargs=gen_kwargs,
                task_manager=task_manager(render_tasks(Path(tmp)), list(spec.tasks)),
                random_seed=spec.seed, numpy_random_seed=spec.seed, torch_random_seed=spec.seed,
                fewshot_random_seed=spec.seed, bootstrap_iters=0,
            )
        if progress is not None:
            progress.update(len(items))
        # through JSON: the harness's results hold numpy values and callables
        return {"harness": json.loads(json.dumps(results, default=handle_non_serializable))}

    def score(self, config: ExperimentConfig, outputs: dict[str, Any]) -> tuple[dict[str, float], list[dict[str, Any]]]:
        harness = outputs["harness"]
        metrics: dict[str, float] = {}
        for task, values in harness["results"].items():
            for key, value in values.items():
                name, _, _filter = key.partition(",")
                if name.endswith("_stderr") or name in ("alias", "sample_len") or not isinstance(value, (int, float)):
                    continue
                metrics[metric_name(f"{task}_{name}")] = float(value)
        items = []
        for task, samples in harness.get("samples", {}).items():
            for sample in samples:
                metric_keys = [k for k in harness["results"][task] if not k.split(",")[0].endswith("_stderr")
                               and k.split(",")[0] in sample]
                score = sample[metric_keys[0].split(",")[0]] if metric_keys else None
                items.append({"id": f"{task}/{sample['doc_id']}", "task": task, "target": str(sample.get("target")),
                              "prediction": _prediction(sample),
                              **({"score": float(score)} if isinstance(score, (int, float)) else {})})
        return metrics, items


def _prediction(sample: dict[str, Any]) -> str:
    filtered = sample.get("filtered_resps")
    if isinstance(filtered, list) and filtered and isinstance(filtered[0], list):  # loglikelihood: [ll, greedy]
        lls = [float(choice[0]) for choice in filtered]
        return str(max(range(len(lls)), key=lls.__getitem__))
    return str(filtered[0] if isinstance(filtered, list) and filtered else filtered)


SUITE = HarnessSuite()
