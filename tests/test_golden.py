"""Golden losses: a seeded run of every training phase on tiny data, pinned in
``tests/assets/golden_losses.json`` (STYLE.md #9c).

The chain is the default pipeline's (pretrain -> semantics -> init -> masks -> adapt, plus the
oracle), each phase run in this process exactly as a Ray Train worker runs it (one thread, one
rank), from data made by the real generator. A refactor that should change no number proves
it by leaving this file untouched; a change that is meant to alter the numbers regenerates it
with ``ADASEG_UPDATE_GOLDEN=1 pytest tests/test_golden.py`` and says why in its commit.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tests import golden_harness as harness

GOLDEN = Path(__file__).parent / "assets" / "golden_losses.json"
#: relative tolerance: loose enough for another CPU's summation order, far below any change
#: of what a phase computes (one changed step moves these values by 1e-3 or more)
RTOL = 1e-4


@pytest.fixture(scope="module")
def golden_run(ray_local) -> dict:
    with tempfile.TemporaryDirectory() as d:
        return harness.run_chain(Path(d))


def _compare(got, want, where: str) -> None:
    if isinstance(want, dict):
        assert set(got) == set(want), f"{where}: keys {sorted(got)} != {sorted(want)}"
        for k in want:
            _compare(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert len(got) == len(want), f"{where}: {len(got)} entries, expected {len(want)}"
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _compare(g, w, f"{where}[{i}]")
    else:
        assert np.isclose(got, want, rtol=RTOL, atol=1e-7), f"{where}: {got!r} != golden {want!r}"


def test_every_phase_computes_what_it_computed_before(golden_run):
    if os.environ.get("ADASEG_UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(golden_run, indent=1, sort_keys=True) + "\n")
    want = json.loads(GOLDEN.read_text())
    _compare(golden_run, want, "golden")


def test_golden_run_is_deterministic_in_process(golden_run, ray_local):
    # the guard means something only if a second run reproduces the first one exactly
    with tempfile.TemporaryDirectory() as d:
        again = harness.run_chain(Path(d), phases=("pretrain",))
    assert again["pretrain"] == golden_run["pretrain"]
    assert torch.get_num_threads() >= 1
