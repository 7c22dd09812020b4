"""The search space of a sweep (``params.yaml: tune.space``) as Ray Tune / Optuna see it.

``gamma_min < gamma_max`` holds by construction: grids drop the invalid pairs, random search
draws gamma_min below the gamma_max it drew, and the Optuna space suggests gamma_max first.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
from ray import tune

from components.config import GAMMA_MARGIN, Params, SearchDim, TuneConfig


def overrides_of(config: dict) -> dict[str, Any]:
    """A trial config (nested by section, Optuna's ``a/b`` keys, or a grid ``point``) as
    dotted params overrides ``{"adapt.gamma_max": 0.8, ...}``."""
    out: dict[str, Any] = {}

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            key = key.replace("/", ".")
            if key == "point":
                walk(value, prefix)
            elif isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                out[f"{prefix}{key}"] = value.item() if isinstance(value, np.generic) else value

    walk(config, "")
    return out


def int_keys(params: Params) -> set[str]:
    """Swept keys whose params field is an integer (sampled as integers)."""
    out = set()
    for key in params.tune.flat_space():
        section, name = key.split(".")
        if type(getattr(params, section)).model_fields[name].annotation is int:
            out.add(key)
    return out


def _below(dim: SearchDim, bound: float, rng: np.random.Generator):
    """A value of ``dim`` strictly below ``bound`` (gamma_min given gamma_max). The params
    validation guarantees that one exists (every gamma_max leaves ``GAMMA_MARGIN`` of room)."""
    if dim.values is not None:
        ok = [v for v in dim.values if v < bound]
        return ok[int(rng.integers(len(ok)))]
    high = min(dim.high, bound - GAMMA_MARGIN / 2)
    if dim.log:
        return float(math.exp(rng.uniform(math.log(dim.low), math.log(high))))
    return float(rng.uniform(dim.low, high))


def _gamma_floor(params: Params) -> float:
    space = params.tune.flat_space()
    dim = space.get("adapt.gamma_min")
    return min(dim.candidates()) if dim else params.adapt.gamma_min


def grid_points(params: Params) -> list[dict[str, Any]]:
    """The Cartesian product of every entry's ``values``, without gamma_min >= gamma_max;
    ``tune.num_samples`` > 1 repeats it with seeds ``seed``, ``seed + 1``, ..."""
    space = params.tune.flat_space()
    combos = itertools.product(*(d.values for d in space.values()))
    points = [dict(zip(space, combo, strict=True)) for combo in combos]
    gmin, gmax = params.adapt.gamma_min, params.adapt.gamma_max
    points = [p for p in points if p.get("adapt.gamma_min", gmin) < p.get("adapt.gamma_max", gmax)]
    if params.tune.num_samples == 1:
        return points
    return [{**p, "seed": params.seed + r} for r in range(params.tune.num_samples) for p in points]


def optuna_space(params: Params):
    """Optuna define-by-run space: gamma_max is drawn first, gamma_min below it."""
    space, seed = params.tune.flat_space(), params.seed
    ints = int_keys(params)
    gmin_key, gmax_key = "adapt.gamma_min", "adapt.gamma_max"
    floor = _gamma_floor(params)

    def define(trial):
        chosen: dict[str, Any] = {}
        fixed: dict[str, Any] = {}  # returned values override what Optuna recorded
        for key, dim in sorted(space.items(), key=lambda kv: kv[0] == gmin_key):
            name = key.replace(".", "/")
            bound = chosen.get(gmax_key, params.adapt.gamma_max)
            if dim.values is not None:
                value = trial.suggest_categorical(name, dim.values)
                if key == gmin_key and value >= bound:  # categorical spaces must stay static
                    value = fixed[name] = _below(dim, bound, np.random.default_rng(seed))
            elif key in ints:
                value = trial.suggest_int(name, int(dim.low), int(dim.high), log=dim.log)
            else:
                low, high = dim.low, dim.high
                if key == gmin_key:
                    high = min(high, bound - GAMMA_MARGIN / 2)
                if key == gmax_key:
                    low = max(low, floor + GAMMA_MARGIN)
                value = trial.suggest_float(name, low, high, log=dim.log)
            chosen[key] = value
        return fixed or None

    return define


def search_space(params: Params):
    """Tune's ``param_space`` and search algorithm for ``params.tune``."""
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    tcfg, seed = params.tune, params.seed
    space, ints = tcfg.flat_space(), int_keys(params)
    gmin_key, gmax_key = "adapt.gamma_min", "adapt.gamma_max"
    fixed_max = params.adapt.gamma_max

    if tcfg.search == "grid":
        grid = {"point": tune.grid_search(grid_points(params))}
        return grid, BasicVariantGenerator(random_state=seed)

    if tcfg.search == "random":
        nested: dict[str, dict] = {}
        swept_max = gmax_key in space

        def gamma_min(spec, dim):
            # attribute access: Tune resolves gamma_max first, whatever the key order
            bound = spec.config.adapt.gamma_max if swept_max else fixed_max
            return _below(dim, bound, np.random.default_rng([seed, int(bound * 1e9)]))

        for key, dim in space.items():
            section, name = key.split(".")
            if key == gmin_key:
                dom = tune.sample_from(lambda spec, d=dim: gamma_min(spec, d))
            elif dim.values is not None:
                dom = tune.choice(dim.values)
            elif key in ints:
                lo, hi = int(dim.low), int(dim.high) + 1
                dom = tune.lograndint(lo, hi) if dim.log else tune.randint(lo, hi)
            else:
                low = dim.low
                if key == gmax_key:  # leave room for a gamma_min below it
                    low = max(low, _gamma_floor(params) + GAMMA_MARGIN)
                dom = tune.loguniform(low, dim.high) if dim.log else tune.uniform(low, dim.high)
            nested.setdefault(section, {})[name] = dom
        return nested, BasicVariantGenerator(random_state=seed)

    from ray.tune.search.optuna import OptunaSearch

    # metric and mode here: Tune forwards them only to searchers of a non-empty param_space
    searcher = OptunaSearch(space=optuna_space(params), metric=tcfg.metric, mode="max", seed=seed)
    if tcfg.max_concurrent:
        searcher = ConcurrencyLimiter(searcher, max_concurrent=tcfg.max_concurrent)
    return {}, searcher


def scheduler(tcfg: TuneConfig):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if tcfg.scheduler == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="training_iteration",
        max_t=tcfg.epochs,
        grace_period=tcfg.grace_period,
        reduction_factor=tcfg.reduction_factor,
    )
