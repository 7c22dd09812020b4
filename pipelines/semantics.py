"""Stage ``semantics``: Content-aware Semantic Modeling from the stage-1 model (SDA Section 3.2).

Runs as one Ray task (local cores or a cluster node). Outputs (under ``--out``):
``labels.parquet`` (sample_id, domain, category, entropy, common, predicted_empty: the
stage-1 model finds nothing for a target query), ``prototypes.npy`` (the source content
prototypes C^s), ``predictor.pt`` (the word-importance MLP state_dict), with
``semantics.word_grounding: visual`` ``word_grounding.json`` (the target-only words grounded,
read by ``init``) and, to ``--metrics``, k_s / k_t / k_u with purity and NMI against the
benchmark's true categories (a diagnostic: never used for training), and the grounding's
agreement with the embedded benchmark's synonym table.
"""

from __future__ import annotations

import logging
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import ray
import torch

from components.adaptation.sda import grounding
from components.adaptation.sda import semantics as sem
from components.config import Params
from components.data.dataset import SplitArrays
from components.data.synthetic import synonym_map
from components.data.vocab import Vocab
from components.io import atomic_path, write_json
from components.models.network import load_trained
from components.runtime import init_ray, node_cpus
from components.stage_io import load_query_split
from components.tracking import stage_run
from pipelines.common import repo_root

log = logging.getLogger(__name__)


@ray.remote(num_cpus=1)
def _semantics_task(model, source: SplitArrays, target: SplitArrays, params: Params, vocab):
    torch.set_num_threads(int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))
    return sem.compute(model, source, target, params, vocab)


def run(params: Params, data_dir: Path, model_dir: Path, out: Path) -> dict:
    vocab = Vocab.load(data_dir / "vocab.json")
    source = load_query_split(params, data_dir, "source", "train", vocab)
    target = load_query_split(params, data_dir, "target", "train", vocab)
    model, _ = load_trained(model_dir)
    init_ray(params.runtime)
    # the free CPUs, as many as one node has: a task does not span nodes
    cpus = max(1, min(int(ray.available_resources().get("CPU", 1)), node_cpus()))
    res, diag = ray.get(
        _semantics_task.options(num_cpus=cpus).remote(model, source, target, params, vocab)
    )
    if res.grounding is not None:
        for word, (known, score) in sorted(res.grounding.mapping.items()):
            log.info("semantics: %r grounded to %r (correlation %.2f)", word, known, score)
        if params.data.dataset == "synthetic":  # a diagnostic, as purity and NMI are
            diag.update(grounding.agreement(res.grounding, synonym_map()))
    labels = pd.DataFrame(
        {
            "sample_id": source.sample_ids + target.sample_ids,
            "domain": ["source"] * len(source) + ["target"] * len(target),
            "category": np.concatenate([res.labels_s, res.labels_t]),
            "entropy": np.concatenate([np.zeros(len(source)), res.entropy_t]),
            "common": np.concatenate([np.ones(len(source), bool), res.reliable_t]),
            # source: the annotation; target: the stage-1 model's prediction (no labels)
            "predicted_empty": np.concatenate([~source.has_mask(), res.empty_t]),
        }
    )
    with atomic_path(out, is_dir=True) as tmp:
        labels.to_parquet(tmp / "labels.parquet", index=False)
        np.save(tmp / "prototypes.npy", res.prototypes)
        if res.predictor is not None:
            torch.save(res.predictor.state_dict(), tmp / "predictor.pt")
        if res.grounding is not None:
            write_json(tmp / grounding.FILE, res.grounding.to_json())
    if res.predictor_losses:
        diag["predictor_loss"] = res.predictor_losses[-1]
    return diag


def main(params: Params, data: str, model: str, out: str, metrics: str) -> None:
    used = {"seed": params.seed, "semantics": params.semantics.model_dump(mode="json")}
    with stage_run("semantics", params.runtime, used, repo_root()):
        diag = run(params, Path(data), Path(model), Path(out))
        write_json(metrics, diag)
        mlflow.log_metrics({k: float(v) for k, v in diag.items()})
        for key in ("k_s", "k_t", "k_u"):
            if diag[key] <= 1 and key != "k_u":
                mlflow.set_tag(f"adaseg.warning.{key}", "single category")
    log.info("semantics: %s", {k: round(float(v), 3) for k, v in diag.items()})
