"""Names that state written by earlier versions of loraforge refers to: they must keep importing when modules move.

- Tune pickles the trainable by its qualified name into the sweep's state on ray.storage_path, so
  `loraforge run --resume` of a sweep interrupted before a move unpickles `pipeline.sweep.run_trial`.
- A registered version carries its own copy of `python_model.py` (MLflow "models from code"), which
  imports loraforge by name when `mlflow.pyfunc.load_model` runs it, however old the version is.
- The warm pool preloads modules by name; `python -m pipeline.cli`, the `loraforge` entry point and
  `jobs/sweep.py` are how users and clusters start it.
"""

from __future__ import annotations

import ast
import importlib
import pickle
import subprocess
import sys
from pathlib import Path

from tests.support.configs import REPO

# what registered versions' python_model.py imports (pipeline/registry/pyfunc_model.py, every version so far)
REGISTERED_MODEL_NAMES = {
    "pipeline.config": ["ExperimentConfig", "ClassificationData"],
    "pipeline.eval.stage": ["load_model"],
    "pipeline.registry": ["lineage"],
    "pipeline": ["data"],
    "pipeline.eval.generation": ["generate"],
}


# pickle stores a module-level function as (module, qualified name); these are what sweep state written
# before `pipeline/sweep.py` became a package holds (protocol 4, as Tune writes tuner.pkl)
PICKLED_BEFORE_THE_SPLIT = {
    "run_trial": b"\x80\x04\x95 \x00\x00\x00\x00\x00\x00\x00\x8c\x0epipeline.sweep\x94\x8c\trun_trial\x94\x93\x94.",
    "_restored_callback": (b"\x80\x04\x95,\x00\x00\x00\x00\x00\x00\x00\x8c\x0epipeline.sweep\x94\x8c"
                           b"\x12_restored_callback\x94\x93\x94)R\x94."),
}


def test_tune_finds_the_trainable_by_the_name_it_pickled():
    from ray.tune import Callback

    from pipeline import sweep
    from pipeline.sweep import trial

    restored = pickle.loads(PICKLED_BEFORE_THE_SPLIT["run_trial"])
    assert restored is sweep.run_trial is trial.run_trial
    # a callback pickled by an old sweep comes back as the placeholder run_sweep replaces
    assert type(pickle.loads(PICKLED_BEFORE_THE_SPLIT["_restored_callback"])) is Callback
    # and what today's code pickles comes back too
    assert pickle.loads(pickle.dumps(sweep.run_trial)) is sweep.run_trial


def test_registered_models_code_imports_resolve():
    """Today's pyfunc file imports only names on the list, and every name on the list imports."""
    source = (REPO / "pipeline" / "registry" / "pyfunc_model.py").read_text()
    imported: dict[str, set[str]] = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline"):
            imported.setdefault(node.module, set()).update(a.name for a in node.names)
    for module, names in imported.items():
        assert names <= set(REGISTERED_MODEL_NAMES.get(module, [])), (module, names)
    for module, names in REGISTERED_MODEL_NAMES.items():
        loaded = importlib.import_module(module)
        for name in names:
            assert hasattr(loaded, name) or importlib.util.find_spec(f"{module}.{name}"), f"{module}.{name}"


def test_warm_pool_modules_and_entrypoints_import():
    from pipeline import warmpool

    for module in warmpool.PRELOAD_MODULES:
        importlib.import_module(module)
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "--help"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "run" in out.stdout, out.stderr[-2000:]
    script = Path(REPO / "jobs" / "sweep.py").read_text()
    assert "from pipeline.cli import app" in script and "from pipeline import jobs" in script
    for name in ("cli", "jobs"):
        importlib.import_module(f"pipeline.{name}")
