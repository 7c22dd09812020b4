"""The comparison's planner without running it: which units exist, what each needs, and how
many run at once (the end-to-end run is ``test_compare.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from components.config import parse_params
from pipelines.compare import concurrency, plan
from tests.conftest import _merge, tiny_params


def _params(**compare):
    raw = _merge(tiny_params(), {"compare": compare})
    return parse_params(raw), raw


def test_plan_has_every_unit_with_its_dependencies(tmp_path: Path):
    params, raw = _params(methods=["sda", "dacs"], tasks=["referring", "semantic"], seeds=[3])
    units = {u.name: u for u in plan(params, raw, tmp_path)}
    ref, sem = "seed3/referring", "seed3/semantic"
    assert set(units) == {
        "seed3/prepare",
        *(f"{t}/{p}" for t in (ref, sem) for p in ("pretrain", "oracle", "adapt-dacs", "evaluate")),
        f"{ref}/semantics",
        f"{ref}/init",
        f"{ref}/masks",
        f"{ref}/adapt-sda",  # SDA is referring only: no semantic SDA unit
    }
    assert units[f"{ref}/adapt-sda"].deps == [f"{ref}/init", f"{ref}/masks"]
    assert units[f"{sem}/adapt-dacs"].deps == [f"{sem}/pretrain"]
    assert set(units[f"{ref}/evaluate"].deps) == {
        f"{ref}/pretrain",
        f"{ref}/oracle",
        f"{ref}/adapt-sda",
        f"{ref}/adapt-dacs",
    }
    # each unit runs its own seed and task, and only its method's section
    p = units[f"{sem}/adapt-dacs"].params
    assert (p["seed"], p["data"]["task"], p["adapt"]["method"]) == (3, "semantic", "dacs")
    assert "sda" not in p["adapt"]
    assert units[f"{sem}/adapt-dacs"].tags["adaseg.method"] == "dacs"


@pytest.mark.parametrize(
    ("num_cpus", "cpus_per_run", "max_concurrent", "expected"),
    [
        (1, 1, None, 1),  # one CPU: one unit at a time
        (2, 2, None, 1),
        (2, 1, None, 2),
        (8, 2, None, 4),
        (2, 2, 3, 3),  # an explicit limit wins
    ],
)
def test_concurrency_follows_the_local_instance(num_cpus, cpus_per_run, max_concurrent, expected):
    raw = _merge(
        tiny_params(),
        {
            "runtime": {"num_cpus": num_cpus},
            "compare": {"cpus_per_run": cpus_per_run, "max_concurrent": max_concurrent},
        },
    )
    assert concurrency(parse_params(raw)) == expected


def test_units_sharing_the_machine_get_a_cpu_budget(tmp_path: Path):
    params, raw = _params(methods=["mmd"], tasks=["semantic"], seeds=[0], cpus_per_run=1)
    shared = plan(params, raw, tmp_path, workers=2)
    alone = plan(params, raw, tmp_path, workers=1)
    assert all(u.params["runtime"]["train_cpus"] == 1 for u in shared)
    assert all(u.params["runtime"]["num_cpus"] == 1 for u in shared)  # their own local Ray
    untouched = raw["runtime"].get("train_cpus")
    assert all(u.params["runtime"].get("train_cpus") == untouched for u in alone)
