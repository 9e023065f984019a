"""GGUF files as base models: convert once to a plain safetensors folder, cached by the file's sha256.

transformers loads a GGUF file dequantized (`from_pretrained(dir, gguf_file=name)`), but the
loaded model refuses `save_pretrained`, and loading takes tens of seconds. So the file is
converted once: a fresh model built from the GGUF's config gets the dequantized state dict,
and the model and tokenizer are saved as safetensors under
`$LORAFORGE_MODEL_CACHE` (default `~/.cache/loraforge/models`)`/<sha256>/`. Every later load,
in the driver or a worker, reads that folder like any local Hugging Face model.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

MARKER = "loraforge_gguf.json"


class GgufError(ValueError):
    """A GGUF file that is not there or does not parse; the message names the fix."""


def cache_root() -> Path:
    return Path(os.environ.get("LORAFORGE_MODEL_CACHE") or Path.home() / ".cache" / "loraforge" / "models")


@functools.lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    stat = path.stat()
    return _sha256(str(path), stat.st_size, stat.st_mtime_ns)


def check_file(path: Path) -> None:
    """Fail early, naming the fix, unless `path` is a GGUF file whose header parses."""
    if not path.is_file():
        raise GgufError(f"GGUF file {str(path)!r} not found")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise GgufError(f"{str(path)!r} is not a GGUF file (it does not start with 'GGUF'); "
                        "point it at a .gguf model file or a Hugging Face model folder")
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        _ = reader.fields["general.architecture"]
    except ImportError as err:
        raise GgufError("reading GGUF files needs the `gguf` package: pip install gguf") from err
    except Exception as err:  # any parse failure is the file's fault
        raise GgufError(f"{str(path)!r} does not parse as GGUF ({err.__class__.__name__}: "
                        f"{err}); re-download it or reinstall the package that ships it") from None


def converted_dir(path: Path) -> Path:
    """The cached safetensors folder for the GGUF file `path`, converting it first if needed."""
    path = Path(path).resolve()
    check_file(path)
    target = cache_root() / file_sha256(path)
    if (target / MARKER).is_file():
        return target
    log.info("converting %s to safetensors under %s (once per file)", path.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name[:12]}-", dir=target.parent))
    try:
        _convert(path, staging)
        (staging / MARKER).write_text(json.dumps({"gguf_file": str(path), "sha256": target.name}, indent=2))
        try:
            staging.rename(target)
        except OSError:
            if not (target / MARKER).is_file():  # lost a race to another converter: theirs is as good
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _convert(path: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(path.parent), path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    config.architectures = [type(loaded).__name__]
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = type(loaded)(config)
    result = fresh.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in result.missing_keys if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or result.unexpected_keys:
        raise GgufError(f"converting {path.name} left {len(missing)} missing and "
                        f"{len(result.unexpected_keys)} unexpected weights (e.g. {(missing + result.unexpected_keys)[0]})")
    fresh.tie_weights()
    fresh.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
