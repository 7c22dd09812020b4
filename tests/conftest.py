"""Shared fixtures: tiny params derived from the real params.yaml, and a shared local Ray."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

#: The real params.yaml shrunk to seconds of CPU work (STYLE.md #9b).
TINY_OVERRIDES = {
    "data": {
        "splits": {
            "source_train": 64,
            "source_val": 16,
            "target_train": 64,
            "target_val": 16,
            "target_test": 24,
        },
        "shard_size": 40,
    },
    "model": {"widths": [8, 16, 16, 24], "hidden": 16, "embed_dim": 16},
    "pretrain": {"epochs": 2, "batch_size": 16, "warmup_steps": 2},
    "oracle": {"epochs": 1, "batch_size": 16, "warmup_steps": 2},
    "init": {"epochs": 1, "batch_size": 16, "warmup_steps": 2},
    "masks": {"epochs": 1, "batch_size": 16, "warmup_steps": 2},
    "adapt": {"epochs": 2, "batch_size": 8, "warmup_steps": 2, "pixels": 64},
    "evaluate": {"overlay_samples": 4},
    "runtime": {"object_store_memory_mb": 100},
}


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def real_params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def tiny_params() -> dict:
    return _merge(real_params(), TINY_OVERRIDES)


@pytest.fixture
def tiny_raw() -> dict:
    return tiny_params()


@pytest.fixture(scope="session")
def ray_local():
    """One small local Ray instance for the in-process tests."""
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20)
    yield
    ray.shutdown()
