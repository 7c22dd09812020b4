"""The search space of a sweep (``params.yaml: tune.space``) as Ray Tune / Optuna see it.

Keys are dotted params paths: ``semantics.tau``, ``adapt.lr``, ``adapt.<method>.<field>``.
The selected method's ordered pairs (``components.adaptation.configs``: SDA's
``gamma_min < gamma_max``) hold by construction: grids drop the invalid points, random search
draws the lower value below the upper one it drew, and the Optuna space suggests the upper
value first.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
from ray import tune

from components.config import (
    GAMMA_MARGIN,
    Params,
    SearchDim,
    TuneConfig,
    ordered_pairs,
    tunable_sections,
)


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
    sections = tunable_sections(params)
    for key in params.tune.flat_space():
        section, _, name = key.rpartition(".")
        if sections[section].model_fields[name].annotation is int:
            out.add(key)
    return out


def _below(dim: SearchDim, bound: float, rng: np.random.Generator):
    """A value of ``dim`` strictly below ``bound`` (the lower value of an ordered pair given
    the upper one). The params validation guarantees that one exists (every upper value
    leaves ``GAMMA_MARGIN`` of room)."""
    if dim.values is not None:
        ok = [v for v in dim.values if v < bound]
        return ok[int(rng.integers(len(ok)))]
    high = min(dim.high, bound - GAMMA_MARGIN / 2)
    if dim.log:
        return float(math.exp(rng.uniform(math.log(dim.low), math.log(high))))
    return float(rng.uniform(dim.low, high))


def _floor(params: Params, lo_key: str, lo_default: float) -> float:
    """The smallest lower value of an ordered pair the space can draw."""
    dim = params.tune.flat_space().get(lo_key)
    return min(dim.candidates()) if dim else lo_default


def grid_points(params: Params) -> list[dict[str, Any]]:
    """The Cartesian product of every entry's ``values``, without points that break an
    ordered pair; ``tune.num_samples`` > 1 repeats it with seeds ``seed``, ``seed + 1``, ..."""
    space = params.tune.flat_space()
    combos = itertools.product(*(d.values for d in space.values()))
    points = [dict(zip(space, combo, strict=True)) for combo in combos]
    for lo_key, hi_key, lo, hi in ordered_pairs(params):
        points = [p for p in points if p.get(lo_key, lo) < p.get(hi_key, hi)]
    if params.tune.num_samples == 1:
        return points
    return [{**p, "seed": params.seed + r} for r in range(params.tune.num_samples) for p in points]


def optuna_space(params: Params):
    """Optuna define-by-run space: an ordered pair's upper value is drawn first, the lower one
    below it."""
    space, seed = params.tune.flat_space(), params.seed
    ints = int_keys(params)
    pairs = ordered_pairs(params)
    upper_of = {lo: (hi, hi_default) for lo, hi, _, hi_default in pairs}
    floor_of = {hi: _floor(params, lo, lo_default) for lo, hi, lo_default, _ in pairs}

    def define(trial):
        chosen: dict[str, Any] = {}
        fixed: dict[str, Any] = {}  # returned values override what Optuna recorded
        for key, dim in sorted(space.items(), key=lambda kv: kv[0] in upper_of):
            name = key.replace(".", "/")
            bound = None
            if key in upper_of:
                hi_key, hi_default = upper_of[key]
                bound = chosen.get(hi_key, hi_default)
            if dim.values is not None:
                value = trial.suggest_categorical(name, dim.values)
                if bound is not None and value >= bound:  # categorical spaces stay static
                    value = fixed[name] = _below(dim, bound, np.random.default_rng(seed))
            elif key in ints:
                value = trial.suggest_int(name, int(dim.low), int(dim.high), log=dim.log)
            else:
                low, high = dim.low, dim.high
                if bound is not None:
                    high = min(high, bound - GAMMA_MARGIN / 2)
                if key in floor_of:
                    low = max(low, floor_of[key] + GAMMA_MARGIN)
                value = trial.suggest_float(name, low, high, log=dim.log)
            chosen[key] = value
        return fixed or None

    return define


def search_space(params: Params):
    """Tune's ``param_space`` and search algorithm for ``params.tune``."""
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    tcfg, seed = params.tune, params.seed
    space, ints = tcfg.flat_space(), int_keys(params)
    pairs = ordered_pairs(params)
    upper_of = {lo: (hi, hi_default) for lo, hi, _, hi_default in pairs}
    floor_of = {hi: _floor(params, lo, lo_default) for lo, hi, lo_default, _ in pairs}

    if tcfg.search == "grid":
        grid = {"point": tune.grid_search(grid_points(params))}
        return grid, BasicVariantGenerator(random_state=seed)

    if tcfg.search == "random":
        nested: dict[str, dict] = {}

        def lower(spec, dim, hi_key, hi_default):
            # attribute access: Tune resolves the upper value first, whatever the key order
            bound = hi_default
            if hi_key in space:
                bound = spec.config
                for part in hi_key.split("."):
                    bound = getattr(bound, part)
            return _below(dim, bound, np.random.default_rng([seed, int(bound * 1e9)]))

        for key, dim in space.items():
            if key in upper_of:
                hi_key, hi_default = upper_of[key]
                dom = tune.sample_from(
                    lambda spec, d=dim, k=hi_key, v=hi_default: lower(spec, d, k, v)
                )
            elif dim.values is not None:
                dom = tune.choice(dim.values)
            elif key in ints:
                lo, hi = int(dim.low), int(dim.high) + 1
                dom = tune.lograndint(lo, hi) if dim.log else tune.randint(lo, hi)
            else:
                low = dim.low
                if key in floor_of:  # leave room for a lower value below it
                    low = max(low, floor_of[key] + GAMMA_MARGIN)
                dom = tune.loguniform(low, dim.high) if dim.log else tune.uniform(low, dim.high)
            *parents, name = key.split(".")
            node = nested
            for part in parents:
                node = node.setdefault(part, {})
            node[name] = dom
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
        time_attr="epoch",  # the trial's own count (see sweep_report.result_epoch)
        max_t=tcfg.epochs,
        grace_period=tcfg.grace_period,
        reduction_factor=tcfg.reduction_factor,
    )
