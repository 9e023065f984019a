"""The search space: Tune domains from the config's `sweep.parameters`, the finite grid, the searchers."""

from __future__ import annotations

import itertools
import json
from typing import Any

from pipeline.config import ExperimentConfig, ParamDomain
from pipeline.pack import member_name

# a packed sweep's one Tune parameter: the JSON list of the sampled values of a pack's configs
PACK_KEY = "pack"


def param_key(path: str) -> str:
    # Tune flattens nested config keys with "/"; dots stay inside one key
    return path.replace(".", "__")


def dotted_path(key: str) -> str:
    return key.replace("__", ".")


def tune_domain(domain: ParamDomain, searcher: str = "grid") -> Any:
    from ray import tune

    match domain.kind:
        case "grid":
            return tune.grid_search(domain.grid)
        case "pow2":
            return tune.grid_search(domain.values()) if searcher == "grid" else tune.choice(domain.values())
        case "choice":
            return tune.choice(domain.choice)
        case "uniform":
            return tune.uniform(*domain.uniform)
        case "loguniform":
            return tune.loguniform(*domain.loguniform)
        case "randint":
            return tune.randint(*domain.randint)
    raise ValueError(domain.kind)


def grid_points(sweep: Any) -> list[dict[str, Any]]:
    """Every combination of the sweep's values ({dotted path: value}); bounds for continuous domains."""
    paths = list(sweep.parameters)
    axes = [domain.values() for domain in sweep.parameters.values()]
    return [dict(zip(paths, combo)) for combo in itertools.product(*axes)]


def candidate_configs(config: ExperimentConfig) -> list[ExperimentConfig]:
    """Every trial config a finite search space can produce (bounds for continuous domains)."""
    return [config.trial_config(point) for point in grid_points(config.sweep)] or [config.trial_config({})]



def shuffled_grid(sweep: Any, seed: int, concurrency: int) -> tuple[dict[str, Any], Any, int]:
    """The grid (x num_samples) as Tune points to evaluate, in a random order seeded by `seed`.

    Tune's grid search always runs its points in one fixed order; a searcher that first
    evaluates every point in a given order, over `choice` domains of the same values, runs
    the same trials in ours. Tune does not apply `max_concurrent_trials` to a search
    algorithm passed in, so the generator gets the limit itself.
    """
    import random

    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    points = [{param_key(path): value for path, value in point.items()} for point in grid_points(sweep)] * sweep.num_samples
    random.Random(seed).shuffle(points)
    param_space = {param_key(path): tune.choice(domain.values()) for path, domain in sweep.parameters.items()}
    return param_space, BasicVariantGenerator(points_to_evaluate=points, max_concurrent=concurrency), len(points)


def make_search_alg(config: ExperimentConfig) -> Any:
    """Tune's searcher for `sweep.searcher`: OptunaSearch (TPE, seeded by train.seed), or None for Tune's
    own grid and random variant generation."""
    if config.sweep.searcher != "optuna":
        return None
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(seed=config.train.seed)


def pack_members(trial_config: dict[str, Any]) -> list[tuple[str, dict[str, Any]]] | None:
    """(name, sampled values) of a packed trial's configs; None for a trial of one config."""
    if PACK_KEY not in trial_config:
        return None

    return [(member_name(i), sampled) for i, sampled in enumerate(json.loads(trial_config[PACK_KEY]))]
