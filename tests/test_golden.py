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
import ray
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


def test_resumed_adaptation_ends_where_an_uninterrupted_one_does(ray_local, tmp_path):
    """Every piece of a method's state (weights, teacher, bank, optimizer, scheduler, the
    sampling generator) is in its epoch checkpoint: resuming after epoch 1 gives the same
    weights, bit for bit."""
    import contextlib

    from components import train_loop
    from components.adaptation.base import Upstream
    from components.adaptation.phase import AdaptInputs, setup_adapt
    from components.data.dataset import load_split
    from components.data.vocab import Vocab
    from components.tasks import make_task

    raw = harness.tiny_params()
    raw["seed"] = 3
    # DIDA: a teacher, a bank, a step counter and random strong views
    raw["adapt"] = {"method": "dida", "epochs": 2, "batch_size": 12, "warmup_steps": 2}
    raw["tune"].pop("space")
    raw["model"].update(harness.golden_params().model.model_dump(mode="json"))
    params = harness.parse_params(raw, "resume")
    harness.make_data(tmp_path, params)
    vocab = Vocab.load(tmp_path / "vocab.json")
    m = params.model
    split = {
        key: load_split(tmp_path, *key, vocab, m.max_words, m.num_superpixels)
        for key in harness.SIZES
    }
    target = split[("target", "train")]
    target = type(target)(**{**target.__dict__, "masks": target.masks * False, "labels": None})
    task = make_task("referring", m)
    inputs = AdaptInputs(
        task,
        len(vocab),
        task.build_network(len(vocab)).state_dict(),
        Upstream(),
        ray.put(split[("source", "train")]),
        ray.put(target),
        ray.put(split[("target", "val")]),
    )
    spec = train_loop.standalone(train_loop.PhaseSpec("adapt", setup_adapt, params, inputs), 1)

    states = []

    class Keep:
        def from_directory(self, d):
            states.append(torch.load(Path(d) / "state.pt", weights_only=True))

    train_loop.run_phase(spec, 0, lambda: None, lambda row, checkpoint=None: None, Keep())
    full, first = states[-1], states[0]
    torch.save(first, tmp_path / "state.pt")

    class Checkpoint:
        @contextlib.contextmanager
        def as_directory(self):
            yield str(tmp_path)

    states.clear()
    train_loop.run_phase(spec, 0, Checkpoint, lambda row, checkpoint=None: None, Keep())
    assert len(states) == 1  # only epoch 2 ran
    resumed = states[0]["modules"]["method"]
    for key, value in full["modules"]["method"].items():
        assert torch.equal(value, resumed[key]), key
