"""Stage ``adapt``: the adaptation method of ``adapt.method`` through Ray Train.

Starts from ``--init`` (SDA: the stage-2 model; every other method: the stage-1 source
model) and runs :mod:`components.adaptation.phase`: each step a labeled source batch and an
unlabeled target batch (target ground truth is never read, except by the per-epoch validation
on the labeled target val split, which is reporting only: Fig. 4's curve). Writes the method's
inference network like any other model, so ``evaluate`` treats it as one more model.
"""

from __future__ import annotations

import logging
from pathlib import Path

import mlflow
import numpy as np
import ray
import torch

from components import train_loop
from components.adaptation.phase import (
    AdaptInputs,
    build_method,
    load_inputs,
    load_source_val,
    setup_adapt,
)
from components.adaptation.registry import METHODS
from components.adaptation.sda.cfb import masked_mean
from components.adaptation.sda.method import cells
from components.config import Params
from components.data.dataset import network_inputs, to_batch
from components.data.schema import shard_paths
from components.data.vocab import Vocab
from components.io import atomic_path
from components.models.network import load_trained, save_trained
from components.plots import reciprocal_masks, tsne_domains
from components.runtime import init_ray
from components.stage_io import load_masks, load_query_split, write_history
from components.tracking import log_stage, stage_run
from pipelines.common import repo_root

log = logging.getLogger(__name__)


def run(
    params: Params,
    data_dir: Path,
    init: Path,
    semantics: Path | None,
    masks: Path | None,
    out: Path,
) -> dict:
    cfg = params.adapt
    vocab, task, (source, target, val), upstream = load_inputs(params, data_dir, semantics, masks)
    src_val = load_source_val(params, data_dir, task, vocab) if cfg.label_free_metrics else None
    model, _ = load_trained(init)
    init_ray(params.runtime)
    inputs = AdaptInputs(
        task,
        len(vocab),
        model.state_dict(),
        upstream,
        ray.put(source),
        ray.put(target),
        ray.put(val),
        ray.put(src_val) if src_val is not None else None,
    )
    requires = METHODS[cfg.method].requires
    state = train_loop.fit(
        params,
        "adapt",
        cfg,
        setup_adapt,
        inputs,
        inputs=[
            *shard_paths(data_dir, "source", "train"),
            *(shard_paths(data_dir, "source", "val") if src_val is not None else []),
            init / "model.pt",
            *([semantics / "labels.parquet"] if "semantics" in requires else []),
            *([masks / "semantic_masks.parquet"] if "masks" in requires else []),
        ],
    )
    method = build_method(params, inputs)
    method.load_state_dict(state["modules"]["method"])
    history = state["history"]
    meta = {"phase": "adapt", "method": cfg.method, "seed": params.seed}
    with atomic_path(out, is_dir=True) as tmp:
        save_trained(tmp, method.inference_network(), params.model, len(vocab), meta, task)
        write_history(history, tmp / "history.csv")
    return state  # log_stage records it, then drops the checkpoint


@torch.no_grad()
def figures(
    params: Params, data_dir: Path, init: Path, adapted: Path, masks: Path, out: Path, n=300
) -> None:
    """Fig. 7 (t-SNE of foreground features before / after) and Fig. 9 (reciprocal masks).

    Visualisation only: the foreground of both domains is taken from the annotations here.
    """
    vocab = Vocab.load(data_dir / "vocab.json")
    splits = {
        d: load_query_split(params, data_dir, d, "train", vocab) for d in ("source", "target")
    }
    feats: dict[str, dict] = {}
    for name, folder in (("before", init), ("after", adapted)):
        model, _ = load_trained(folder)
        model.eval()
        feats[name] = {}
        for domain, data in splits.items():
            rows = np.flatnonzero(data.has_mask())[:n]
            batch = to_batch(data, rows, torch.device("cpu"))
            f = encoder_features(model, batch)
            mean, _ = masked_mean(f, cells(batch["mask"], f.shape[-2:]))
            feats[name][domain] = mean.numpy()
    tsne_domains(feats["before"], feats["after"], out / "tsne.png", params.seed)

    target = splits["target"]
    rows = np.arange(min(6, len(target)))
    model, _ = load_trained(init)
    model.eval()
    batch = to_batch(target, rows, torch.device("cpu"))
    args, kwargs = network_inputs(batch)
    resp = model(*args, **kwargs)
    domain_masks = (resp["response"] > params.adapt.method_config.gamma_max).numpy()
    semantic = load_masks(masks, target)[rows]
    queries = [target.queries[i] for i in rows]
    reciprocal_masks(
        target.images[rows], domain_masks, semantic, queries, out / "reciprocal_masks.png"
    )


def encoder_features(model, batch: dict) -> torch.Tensor:
    """``features`` of ``model``'s forward on ``batch`` (the last encoder level): from the
    visual side alone where the network encodes images apart from queries (SDA's base network:
    no decoder passes); otherwise (DMMI's, whose encoder reads the query) from the whole
    forward."""
    if hasattr(model, "encode_image"):
        return model.encode_image(batch["image"], batch.get("clip"))[-1]
    args, kwargs = network_inputs(batch)
    return model(*args, **kwargs)["features"]


def main(
    params: Params,
    data: str,
    init: str,
    out: str,
    metrics: str,
    plots: str,
    semantics: str | None = None,
    masks: str | None = None,
    figures_dir: str | None = None,
) -> None:
    used = {
        "seed": params.seed,
        "data.task": params.data.task,
        "model": params.model.model_dump(mode="json"),
        "adapt": params.adapt.model_dump(mode="json", exclude_none=True),
    }
    tags = {"adaseg.method": params.adapt.method, "adaseg.task": params.data.task}
    with stage_run("adapt", params.runtime, used, repo_root()):
        mlflow.set_tags(tags)
        sem_dir, masks_dir = (Path(p) if p else None for p in (semantics, masks))
        state = run(params, Path(data), Path(init), sem_dir, masks_dir, Path(out))
        title = f"adapt ({params.adapt.method}, {params.data.task}, target val per epoch)"
        log_stage("adapt", state, metrics, plots, out, title)
        if figures_dir and params.adapt.method != "sda":
            with atomic_path(figures_dir, is_dir=True):
                pass  # the figures are SDA's (Figs. 7 and 9); the output stays a folder
        elif figures_dir:
            with atomic_path(figures_dir, is_dir=True) as tmp:
                figures(params, Path(data), Path(init), Path(out), Path(masks), tmp)
                mlflow.log_artifacts(str(tmp), artifact_path="figures")
