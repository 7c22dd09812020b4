"""Stage ``masks``: semantic-based target masks (SDA Section 3.3.2, Appendix B.2).

Trains the independent multi-label classifier through Ray Train on the target training
*images*, each labelled with the categories of all its queries (the CSM categories of
``semantics``; a query the stage-1 model finds nothing for contributes none), then turns each
sample's class activation map into a mask (``components.adaptation.sda.cam``). A tenth of the
images (``val_fraction``, chosen by image id) is held out: the classifier's multi-label mAP on
them against the same pseudo-labels is its label-free validation metric. Target ground truth
is read only to report the masks' IoU as a diagnostic, never for training or selection.

Outputs: ``--out/semantic_masks.parquet`` (sample_id, category, score, mask_rle),
``--out/classifier.pt``; ``--metrics``: the classifier's loss against the label-prior loss, its
val mAP, the share of masks kept by the score check, and the diagnostic IoU.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace
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
    label_prior_loss,
    mean_average_precision,
    multi_hot,
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
from components.stage_io import load_labels, load_predicted_empty, load_query_split
from components.tracking import log_history, stage_run
from components.training import autocast
from pipelines.common import repo_root


@dataclass(frozen=True)
class ClassifierInputs:
    encoder_state: dict | None  # the stage-1 visual encoder, or None (from scratch)
    labels: np.ndarray  # (I, K) multi-hot pseudo-labels of the target train images
    image_rows: np.ndarray  # (I,) a row of ``data`` showing each image
    train: np.ndarray  # image positions the classifier trains on
    val: np.ndarray  # held-out image positions (val mAP); may be empty
    data_ref: ray.ObjectRef  # target train split


def held_out(image_ids: list[str], fraction: float) -> np.ndarray:
    """(I,) bool: the images held out for validation, a fixed share chosen by id."""
    out = np.array([zlib.crc32(i.encode()) % 1000 < fraction * 1000 for i in image_ids])
    if fraction > 0 and len(out) > 1 and not out.any():
        out[-1] = True  # tiny data: still one image to validate on
    if out.all():
        out[0] = False
    return out


def classifier(k: int, widths: list[int], cfg, encoder_state: dict | None = None, prior=None):
    """The multi-label classifier as ``masks`` params configure it; ``prior`` (K,) the label
    frequencies its biases start from (training only: a trained state dict carries them)."""
    return MultiLabelClassifier(
        k, widths, encoder_state, cfg.cam_last_stride, cfg.pooling, cfg.lse_r, prior
    )


def setup_classifier(spec: train_loop.PhaseSpec) -> train_loop.Phase:
    tcfg, inp = spec.train_config(), spec.payload
    data: SplitArrays = ray.get(inp.data_ref)
    labels = torch.tensor(inp.labels)  # a copy: the payload's arrays are read-only
    prior = inp.labels[inp.train].mean(0)
    model = classifier(labels.shape[1], spec.params.model.widths, tcfg, inp.encoder_state, prior)
    w = train_loop.prepare_worker(spec, model, len(inp.train), tcfg)
    model, device, rank, indices = w.model, w.device, w.rank, w.indices
    steps, opt, sched = w.steps, w.optimizer, w.scheduler

    def run_epoch(epoch: int, tick) -> dict:
        model.train()
        rng = np.random.default_rng((spec.seed, rank, epoch))
        total, count = 0.0, 0
        for bidx in iterate_batches(len(indices), tcfg.batch_size, shuffle=True, rng=rng):
            images = inp.train[indices[bidx]]
            batch = to_batch(data, inp.image_rows[images], device)["image"]
            with autocast(device, tcfg.amp):
                logits, _ = model(batch)
                loss = multilabel_loss(logits.float(), labels[images].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(images)
            count += len(images)
            if tick:
                tick()
        return {"loss": total / count}

    @torch.no_grad()
    def validate() -> dict:
        if not len(inp.val):
            return {}
        model.eval()
        scores = image_scores(model, data, inp.image_rows[inp.val], device)
        target = inp.labels[inp.val]
        bce = multilabel_loss(torch.logit(torch.from_numpy(scores), 1e-6), torch.from_numpy(target))
        return {"val_loss": float(bce), "val_map": mean_average_precision(target, scores)}

    return train_loop.Phase(
        epochs=tcfg.epochs,
        modules={"classifier": model},
        optimizers={"optimizer": opt, "scheduler": sched},
        train_epoch=run_epoch,
        validate=validate,
        steps_per_epoch=steps,
    )


@torch.no_grad()
def image_scores(model, data: SplitArrays, rows: np.ndarray, device=None) -> np.ndarray:
    """Sigmoid scores (len(rows), K) of the images shown by ``rows``."""
    device = device or torch.device("cpu")
    out = []
    for idx in iterate_batches(len(rows), 64, shuffle=False):
        logits, _ = model(to_batch(data, rows[idx], device)["image"])
        out.append(torch.sigmoid(logits.float()).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


@torch.no_grad()
def semantic_masks(model, data: SplitArrays, classes: np.ndarray, cfg):
    """Each sample's mask from the CAM of its category, refined over its superpixels, empty
    where the classifier's score for the category is below ``cfg.score_threshold``.

    Returns ``(masks (N, H, W) bool, scores (N,))``; the classifier runs once per image.
    """
    model.eval()
    first, image_of = data.images_index()
    rows_of = np.split(np.argsort(image_of, kind="stable"), np.cumsum(np.bincount(image_of))[:-1])
    masks, scores = np.zeros(data.masks.shape, dtype=bool), np.zeros(len(data), np.float32)
    for idx in iterate_batches(len(first), 64, shuffle=False):
        batch = to_batch(data, first[idx], torch.device("cpu"))
        logits, cams = model(batch["image"])
        prob = torch.sigmoid(logits.float())
        for pos, image in enumerate(idx):
            rows = rows_of[image]
            cat = torch.from_numpy(classes[rows])
            k = len(rows)
            cam = category_cam(
                cams[pos : pos + 1].float().expand(k, -1, -1, -1), cat, batch["image"].shape[-2:]
            )
            sp = batch["superpixels"][pos : pos + 1].expand(k, -1, -1)
            refined = superpixel_refine(cam, sp, cfg.fg_threshold)
            score = prob[pos, cat]
            refined &= (score >= cfg.score_threshold).view(-1, 1, 1)
            masks[rows] = refined.numpy()
            scores[rows] = score.numpy()
    return masks, scores


def classifier_inputs(
    target: SplitArrays, cats: np.ndarray, empty: np.ndarray, encoder: dict | None, cfg
) -> tuple[ClassifierInputs, np.ndarray]:
    """The classifier's training inputs from the target train split, its CSM categories and
    the stage-1 model's empty predictions; also each sample's contiguous class id (N,)."""
    _, classes = np.unique(cats, return_inverse=True)  # over the k_t + k_u target categories
    classes = classes.astype(np.int64)
    first, image_of = target.images_index()
    use = ~empty if cfg.drop_predicted_empty else np.ones(len(cats), bool)
    labels = multi_hot(image_of, classes, use, len(first), int(classes.max()) + 1)
    val = held_out([target.image_keys[r] for r in first], cfg.val_fraction)
    inputs = ClassifierInputs(
        encoder, labels, first, np.flatnonzero(~val), np.flatnonzero(val), ray.put(target)
    )
    return inputs, classes


def run(
    params: Params, data_dir: Path, base: Path, semantics: Path, out: Path
) -> tuple[dict, list]:
    tcfg = params.masks
    vocab = Vocab.load(data_dir / "vocab.json")
    # the classifier reads images alone: no clip frames read for it
    target = replace(load_query_split(params, data_dir, "target", "train", vocab), clips=None)
    cats, _ = load_labels(semantics, target)
    empty = load_predicted_empty(semantics, target)
    encoder = load_trained(base)[0].visual.state_dict() if tcfg.init_encoder else None
    init_ray(params.runtime)
    inputs, classes = classifier_inputs(target, cats, empty, encoder, tcfg)
    labels, val = inputs.labels, inputs.val
    k = labels.shape[1]
    state = train_loop.fit(
        params,
        "masks",
        tcfg,
        setup_classifier,
        inputs,
        inputs=[
            *shard_paths(data_dir, "target", "train"),
            base / "model.pt",
            semantics / "labels.parquet",
        ],
    )
    model = classifier(k, params.model.widths, tcfg)
    _unwrap(model).load_state_dict(state["modules"]["classifier"])
    masks, scores = semantic_masks(model, target, classes, tcfg)
    quality = referring_metrics(list(masks), list(target.masks))
    last = state["history"][-1]
    diag = {
        "n_classes": k,
        "images": len(labels),
        "categories_per_image": float(labels.sum(1).mean()),
        "queries_without_category": float(empty.mean()),
        "classifier_loss": last["loss"],
        "label_prior_loss": label_prior_loss(np.delete(labels, val, axis=0)),
        **({"val_map": last["val_map"]} if "val_map" in last else {}),
        "kept_fraction": float(masks.any((1, 2)).mean()),
        "oiou_vs_gt": quality["oiou"],
        "miou_vs_gt": quality["miou"],
        "mask_area": float(masks.mean()),
    }
    table = pd.DataFrame(
        {
            "sample_id": target.sample_ids,
            "category": cats,
            "score": scores,
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
