"""Stage ``masks``: semantic-based target masks (SDA Section 3.3.2, Appendix B.2).

Trains the independent multi-label classifier on target training images with the target
semantic categories (Eq. 12) through Ray Train, then turns each sample's class activation map
into a mask (``components.adaptation.sda.cam``). Target ground truth is read only to report
the masks' IoU as a diagnostic, never for training.

Outputs: ``--out/semantic_masks.parquet`` (sample_id, category, mask_rle),
``--out/classifier.pt``; ``--metrics``: the diagnostic IoU and the classifier's last loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import ray
import torch

from components import train_loop
from components.adaptation.sda.cam import (
    MultiLabelClassifier,
    category_cam,
    multilabel_loss,
    superpixel_refine,
)
from components.config import Params
from components.data.dataset import SplitArrays, iterate_batches, to_batch
from components.data.schema import encode_rle, shard_paths
from components.data.vocab import Vocab
from components.io import atomic_path, write_json
from components.metrics import referring_metrics
from components.models.network import _unwrap, load_trained
from components.runtime import init_ray
from components.stage_io import load_labels, load_query_split
from components.tracking import log_history, stage_run
from components.training import autocast
from pipelines.common import repo_root


@dataclass(frozen=True)
class ClassifierInputs:
    encoder_state: dict | None  # the stage-1 visual encoder, or None (from scratch)
    classes: np.ndarray  # (N,) contiguous target category of each target train sample
    data_ref: ray.ObjectRef  # target train split


def setup_classifier(spec: train_loop.PhaseSpec) -> train_loop.Phase:
    tcfg, inp = spec.train_config(), spec.payload
    widths = spec.params.model.widths
    data: SplitArrays = ray.get(inp.data_ref)
    classes = torch.tensor(inp.classes)
    k = int(classes.max()) + 1
    model = MultiLabelClassifier(k, widths, inp.encoder_state)
    w = train_loop.prepare_worker(spec, model, len(data), tcfg)
    model, device, rank, indices = w.model, w.device, w.rank, w.indices
    steps, opt, sched = w.steps, w.optimizer, w.scheduler

    def run_epoch(epoch: int, tick) -> dict:
        model.train()
        rng = np.random.default_rng((spec.seed, rank, epoch))
        total, correct, count = 0.0, 0, 0
        for bidx in iterate_batches(len(indices), tcfg.batch_size, shuffle=True, rng=rng):
            rows = indices[bidx]
            image = to_batch(data, rows, device)["image"]
            labels = torch.nn.functional.one_hot(classes[rows], k).float().to(device)
            with autocast(device, tcfg.amp):
                logits, _ = model(image)
                loss = multilabel_loss(logits, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(rows)
            correct += int((logits.argmax(1).cpu() == classes[rows]).sum())
            count += len(rows)
            if tick:
                tick()
        return {"loss": total / count, "train_top1": correct / count}

    return train_loop.Phase(
        epochs=tcfg.epochs,
        modules={"classifier": model},
        optimizers={"optimizer": opt, "scheduler": sched},
        train_epoch=run_epoch,
        validate=dict,
        steps_per_epoch=steps,
    )


@torch.no_grad()
def semantic_masks(model, data: SplitArrays, classes: np.ndarray, fg_threshold: float):
    """CAM of each sample's category, refined over its superpixels -> (N, H, W) bool."""
    model.eval()
    out = []
    for idx in iterate_batches(len(data), 64, shuffle=False):
        batch = to_batch(data, idx, torch.device("cpu"))
        _, cams = model(batch["image"])
        cam = category_cam(cams, torch.from_numpy(classes[idx]), batch["image"].shape[-2:])
        out.append(superpixel_refine(cam, batch["superpixels"], fg_threshold).numpy())
    return np.concatenate(out)


def run(
    params: Params, data_dir: Path, base: Path, semantics: Path, out: Path
) -> tuple[dict, list]:
    tcfg = params.masks
    vocab = Vocab.load(data_dir / "vocab.json")
    target = load_query_split(params, data_dir, "target", "train", vocab)
    cats, _ = load_labels(semantics, target)
    # contiguous class ids over the k_t + k_u target categories
    _, classes = np.unique(cats, return_inverse=True)
    classes = classes.astype(np.int64)
    encoder = load_trained(base)[0].visual.state_dict() if tcfg.init_encoder else None
    init_ray(params.runtime)
    state = train_loop.fit(
        params,
        "masks",
        tcfg,
        setup_classifier,
        ClassifierInputs(encoder, classes, ray.put(target)),
        inputs=[
            *shard_paths(data_dir, "target", "train"),
            base / "model.pt",
            semantics / "labels.parquet",
        ],
    )
    model = MultiLabelClassifier(int(classes.max()) + 1, params.model.widths)
    _unwrap(model).load_state_dict(state["modules"]["classifier"])
    masks = semantic_masks(model, target, classes, tcfg.fg_threshold)
    quality = referring_metrics(list(masks), list(target.masks))
    diag = {
        "n_classes": int(classes.max()) + 1,
        "classifier_loss": state["history"][-1]["loss"],
        "oiou_vs_gt": quality["oiou"],
        "miou_vs_gt": quality["miou"],
        "mask_area": float(masks.mean()),
    }
    table = pd.DataFrame(
        {
            "sample_id": target.sample_ids,
            "category": cats,
            "mask_rle": [encode_rle(m) for m in masks],
        }
    )
    with atomic_path(out, is_dir=True) as tmp:
        table.to_parquet(tmp / "semantic_masks.parquet", index=False)
        torch.save(model.state_dict(), tmp / "classifier.pt")
    return diag, state


def main(params: Params, data: str, base: str, semantics: str, out: str, metrics: str) -> None:
    used = {"seed": params.seed, "masks": params.masks.model_dump(mode="json")}
    with stage_run("masks", params.runtime, used, repo_root()):
        diag, state = run(params, Path(data), Path(base), Path(semantics), Path(out))
        write_json(metrics, diag)  # DVC outputs first, then MLflow, then drop the checkpoint
        train_loop.tag_run(state)
        log_history(state["history"])
        mlflow.log_metrics({k: float(v) for k, v in diag.items()})
        train_loop.finish(state)
