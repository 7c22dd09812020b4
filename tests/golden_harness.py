"""Runs every training phase in this process on tiny generated data, for the golden-loss test.

Each phase is built by its stage's worker-side set-up and driven by ``run_phase``, the loop Ray
Train workers and Tune trials run; only the Ray Train process around it is left out.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import ray
import torch

from components import train_loop
from components.adaptation.base import Upstream
from components.adaptation.phase import AdaptInputs, setup_adapt
from components.adaptation.sda.grounding import apply_grounding
from components.adaptation.sda.semantics import compute as csm
from components.config import Params, parse_params
from components.data.dataset import load_split
from components.data.schema import write_shard
from components.data.vocab import Vocab
from components.tasks import make_task
from pipelines import masks, semantic_init, train
from pipelines.prepare import make_rows
from tests.conftest import tiny_params

SIZES = {
    ("source", "train"): 48,
    ("source", "val"): 12,
    ("target", "train"): 48,
    ("target", "val"): 12,
}
PHASES = ("pretrain", "oracle", "semantics", "init", "masks", "adapt", "semantic")


def golden_params() -> Params:
    raw = tiny_params()
    raw["seed"] = 3
    raw["model"].update(widths=[8, 12, 16, 16], hidden=12, embed_dim=12, num_superpixels=40)
    for phase in ("pretrain", "oracle", "init", "masks", "adapt"):
        # float32 on every CPU, whatever params.yaml sets (amp: auto would follow the CPU)
        raw[phase].update(epochs=2, batch_size=12, warmup_steps=2, lr=3e-3, amp=False)
    raw["oracle"]["epochs"] = 1
    raw["adapt"].update(lr=1e-3)
    raw["adapt"]["sda"]["pixels"] = 32
    raw["model"]["empty_threshold"] = 0.3  # so that the tiny models predict something
    raw["data"]["queries_per_image"] = 1  # recorded on benchmark v3: one query per image
    return parse_params(raw, "golden")


def make_data(root: Path, params: Params) -> None:
    queries = []
    for (domain, split), n in SIZES.items():
        table = make_rows(params.data, params.seed, domain, split, 0, n)
        folder = root / domain / split
        folder.mkdir(parents=True)
        write_shard(table, folder / "part-00000.parquet")
        if split == "train":
            queries += table.column("query").to_pylist()
    Vocab.build(queries).save(root / "vocab.json")


class _Capture:
    """Stands in for Ray's ``report`` / ``Checkpoint``: keeps every row and the last state."""

    def __init__(self):
        self.rows: list[dict] = []
        self.state: dict | None = None

    def from_directory(self, d: str):
        self.state = torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=True)
        return d

    def report(self, row: dict, checkpoint=None) -> None:
        self.rows.append(row)


def _run(setup, payload, params: Params, phase: str) -> tuple[list[dict], dict]:
    cap = _Capture()
    spec = train_loop.PhaseSpec(phase, setup, params, payload)
    train_loop.run_phase(train_loop.standalone(spec, 1), 0, lambda: None, cap.report, cap)
    return cap.rows, cap.state


#: each epoch row's number and timings: not what a phase computes
TIMINGS = ("seconds", "val_seconds", "samples_per_s", "epoch")


def _summary(rows: list[dict], state: dict) -> dict:
    keep = [{k: float(v) for k, v in r.items() if k not in TIMINGS} for r in rows]
    sums = {
        name: float(sum(t.double().abs().sum() for t in sd.values() if t.is_floating_point()))
        for name, sd in state["modules"].items()
    }
    return {"history": keep, "weights_abs_sum": sums}


def run_chain(root: Path, phases=PHASES, in_memory: str = "decoded") -> dict:
    """Every phase of ``phases`` in pipeline order; returns what the golden file pins.
    ``in_memory``: how the splits are held (``runtime.data_in_memory``)."""
    torch.set_num_threads(1)
    params = golden_params()
    make_data(root, params)
    mcfg = params.model
    vocab = Vocab.load(root / "vocab.json")
    args = (vocab, mcfg.max_words, mcfg.num_superpixels)
    split = {(d, s): load_split(root, d, s, *args, in_memory=in_memory) for d, s in SIZES}
    out: dict = {}

    task = make_task("referring", mcfg)

    def supervised(phase, domain):
        inputs = train.SupervisedInputs(
            task,
            len(vocab),
            None,
            ray.put(split[(domain, "train")]),
            ray.put(split[(domain, "val")]),
        )
        return _run(train.setup_supervised, inputs, params, phase)

    rows, state = supervised("pretrain", "source")
    out["pretrain"] = _summary(rows, state)
    if "oracle" in phases:
        out["oracle"] = _summary(*supervised("oracle", "target"))
    if "semantics" not in phases:
        return out

    stage1 = train_model(params, len(vocab), state["modules"]["model"])
    source, target = split[("source", "train")], split[("target", "train")]
    res, diag = csm(stage1, source, target, params, vocab)
    out["semantics"] = {k: float(v) for k, v in sorted(diag.items())}
    cats_s, cats_t, common_t = res.labels_s, res.labels_t, res.reliable_t
    # as the init stage: the stage-1 weights with the grounded word rows
    grounded = copy.deepcopy(stage1)
    if res.grounding is not None:
        apply_grounding(grounded, vocab, res.grounding.words())

    inputs = semantic_init.InitInputs(
        task,
        len(vocab),
        grounded.state_dict(),
        cats_s,
        ray.put(source),
        ray.put(split[("source", "val")]),
    )
    rows, init_state = _run(semantic_init.setup_init, inputs, params, "init")
    out["init"] = _summary(rows, init_state)

    inputs, classes = masks.classifier_inputs(
        target, cats_t, res.empty_t, stage1.visual.state_dict(), params.masks
    )
    rows, mstate = _run(masks.setup_classifier, inputs, params, "masks")
    out["masks"] = _summary(rows, mstate)
    clf = masks.classifier(inputs.labels.shape[1], mcfg.widths, params.masks)
    clf.load_state_dict(mstate["modules"]["classifier"])
    sem_masks, _ = masks.semantic_masks(clf, target, classes, params.masks)
    out["masks"]["mask_area"] = float(sem_masks.mean())

    adapt_target = replace(target, masks=sem_masks, labels=None)
    inputs = AdaptInputs(
        task,
        len(vocab),
        init_state["modules"]["model"],
        Upstream(cats_s, cats_t, common_t),
        ray.put(source),
        ray.put(adapt_target),
        ray.put(split[("target", "val")]),
    )
    rows, astate = _run(setup_adapt, inputs, params, "adapt")
    out["adapt"] = _summary(rows, astate)
    if "semantic" in phases:
        out.update(semantic_chain(root, params, vocab, in_memory))
    return out


def semantic_chain(root: Path, params: Params, vocab: Vocab, in_memory: str) -> dict:
    """The semantic task: stage-1 training, then DACS (ClassMix) from it (pinned since the
    task was added)."""
    from components.data.synthetic import CATEGORIES

    classes = ["background", *CATEGORIES]
    task = make_task("semantic", params.model, classes)
    m = params.model
    split = {
        key: load_split(
            root, *key, vocab, m.max_words, m.num_superpixels, "semantic", 7, in_memory=in_memory
        )
        for key in SIZES
    }
    inputs = train.SupervisedInputs(
        task,
        len(vocab),
        None,
        ray.put(split[("source", "train")]),
        ray.put(split[("source", "val")]),
    )
    out = {}
    rows, state = _run(train.setup_supervised, inputs, params, "pretrain")
    out["semantic_pretrain"] = _summary(rows, state)
    raw = params.model_dump(mode="json", exclude_none=True)
    raw["adapt"] = {**{k: v for k, v in raw["adapt"].items() if k != "sda"}, "method": "dacs"}
    raw["data"]["task"] = "semantic"
    raw["tune"].pop("space")
    dacs_params = parse_params(raw, "golden-dacs")
    target = split[("target", "train")]
    target = target.without_masks()
    inputs = AdaptInputs(
        task,
        len(vocab),
        state["modules"]["model"],
        Upstream(),
        ray.put(split[("source", "train")]),
        ray.put(target),
        ray.put(split[("target", "val")]),
    )
    rows, astate = _run(setup_adapt, inputs, dacs_params, "adapt")
    out["semantic_dacs"] = _summary(rows, astate)
    return out


def train_model(params: Params, vocab_size: int, state: dict):
    from components.models.network import build_model

    model = build_model(params.model, vocab_size)
    model.load_state_dict(state)
    return model


#: Kernels pinned to AVX2 for the golden run: PyTorch's own CPU kernels, oneDNN's convolutions
#: and MKL all pick their instruction set at run time, and AVX-512 kernels sum in another
#: order. The cascade through a thresholded mask (the ``masks`` stage) then moves later values
#: by ~1e-3: pinned, the golden file holds on any x86-64 machine with AVX2.
PINNED_ISA = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"}


def run_chain_pinned(root: Path, phases=PHASES, in_memory: str = "decoded") -> dict:
    """:func:`run_chain` in a fresh process with :data:`PINNED_ISA` (it must be set before
    the process's first kernel runs, so not in the test process)."""
    import json
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    env = {**os.environ, **PINNED_ISA, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "tests.golden_harness", in_memory, str(root), *phases]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode:
        raise RuntimeError(f"golden run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    import json
    import sys

    from components.runtime import use_loopback

    use_loopback()
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20)
    in_memory, root, *phases = sys.argv[1:]
    result = run_chain(Path(root), tuple(phases) or PHASES, in_memory)
    print(json.dumps(result))
