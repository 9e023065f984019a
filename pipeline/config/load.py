"""Loading: YAML (safe, bounded) + env + `key.sub=value` overrides -> a validated ExperimentConfig, every problem named."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import yaml
from pydantic import ValidationError

from pipeline import redact
from pipeline.config.base import ConfigError
from pipeline.config.experiment import ExperimentConfig, clean_msg, set_path
from pipeline.config.strategy import STRATEGY_KINDS
from pipeline.datafiles import data_root


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
            set_path(raw, key, env[var])
    for key, value in parse_overrides(overrides or []):
        if key.startswith("sweep.parameters."):
            raw.setdefault("sweep", {}).setdefault("parameters", {})[key.removeprefix("sweep.parameters.")] = value
        else:
            set_path(raw, key, value)

    try:
        config = ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            loc = ".".join(str(part) for part in _strip_union_tags(e["loc"]))
            fix = _FIXES.get(e["type"], "")
            msg = clean_msg(e["msg"])
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
        tags = {"data": ("classification", "instruction", "data_to_text", "chat"), "strategy": STRATEGY_KINDS}[parts[0]]
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
