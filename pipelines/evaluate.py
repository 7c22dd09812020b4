"""Stage ``evaluate``: every trained model on every evaluation split.

Each (model, split) pair is one Ray task (local cores or cluster nodes). Outputs:

* ``metrics/eval.json``: model -> split -> metric (oiou, miou, map, prec@K, zero_acc, n);
* ``predictions/<model>/<split>.parquet``: sample_id, predicted COCO RLE, score, IoU, so
  anyone can recompute the metrics;
* ``plots/overlays/<model>.png``: predictions over target test images (also in MLflow).
"""

from __future__ import annotations

import logging
from pathlib import Path

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from components.config import Params
from components.data.dataset import SplitArrays, load_split
from components.data.schema import PREDICTION_SCHEMA, encode_rle
from components.data.vocab import Vocab
from components.io import atomic_path, write_json
from components.metrics import mask_iou_stats, referring_metrics
from components.models.network import load_trained
from components.plots import overlay_grid
from components.runtime import init_ray
from components.tracking import stage_run
from components.training import predict
from pipelines.common import repo_root

log = logging.getLogger(__name__)


def split_parts(name: str) -> tuple[str, str]:
    domain, split = name.split("_")
    return domain, split


@ray.remote(num_cpus=1)
def _predict_task(model, data: SplitArrays, batch_size: int, empty_threshold: float):
    torch.set_num_threads(1)
    return predict(model, data, batch_size, torch.device("cpu"), empty_threshold)


def run(params: Params, data_dir: Path, model_dirs: list[Path]):
    """Returns ({model: {split: metrics}}, {(model, split): (masks, scores, data)})."""
    mcfg = params.model
    vocab = Vocab.load(data_dir / "vocab.json")
    splits = {
        s: load_split(data_dir, *split_parts(s), vocab, mcfg.max_words, mcfg.num_superpixels)
        for s in params.evaluate.splits
    }
    init_ray(params.runtime)
    data_refs = {s: ray.put(d) for s, d in splits.items()}
    jobs = {}
    for folder in model_dirs:
        model, info = load_trained(folder)
        threshold = info["model"]["empty_threshold"]
        model_ref = ray.put(model)
        for s in splits:
            jobs[(folder.name, s)] = _predict_task.remote(
                model_ref, data_refs[s], params.evaluate.batch_size, threshold
            )
    results, outputs = {}, {}
    for (name, s), ref in jobs.items():
        masks, scores = ray.get(ref)
        results.setdefault(name, {})[s] = referring_metrics(
            list(masks), list(splits[s].masks), list(scores)
        )
        outputs[(name, s)] = (masks, scores, splits[s])
    return results, outputs


def write_predictions(path: Path, masks: np.ndarray, scores: np.ndarray, data: SplitArrays):
    ious = []
    for m, g in zip(masks, data.masks, strict=True):
        inter, union = mask_iou_stats(m, g)
        ious.append(inter / union if union else 1.0)
    table = pa.Table.from_pydict(
        {
            "sample_id": data.sample_ids,
            "pred_rle": [encode_rle(m) for m in masks],
            "score": scores.astype(np.float32),
            "iou": np.asarray(ious, dtype=np.float32),
        },
        schema=PREDICTION_SCHEMA,
    )
    pq.write_table(table, path)


def main(
    params: Params, data: str, models: list[str], metrics: str, predictions: str, overlays: str
) -> None:
    model_dirs = [Path(m) for m in models]
    used = {
        "model.empty_threshold": params.model.empty_threshold,
        "evaluate": params.evaluate.model_dump(mode="json"),
    }
    with stage_run("evaluate", params.runtime, used, repo_root()):
        results, outputs = run(params, Path(data), model_dirs)
        with atomic_path(predictions, is_dir=True) as tmp:
            for (name, s), (masks, scores, split) in outputs.items():
                (tmp / name).mkdir(exist_ok=True)
                write_predictions(tmp / name / f"{s}.parquet", masks, scores, split)
        n = params.evaluate.overlay_samples
        with atomic_path(overlays, is_dir=True) as tmp:
            for (name, s), (masks, _scores, split) in outputs.items():
                if s != "target_test" or n == 0:
                    continue
                overlay_grid(
                    split.images[:n],
                    split.masks[:n],
                    masks[:n],
                    split.queries[:n],
                    tmp / f"{name}.png",
                    f"{name} on {s}",
                )
            mlflow.log_artifacts(str(tmp), artifact_path="overlays")
        write_json(metrics, results)
        for name, per_split in results.items():
            for s, vals in per_split.items():
                mlflow.log_metrics(
                    {f"{name}.{s}.{k}".replace("@", "_at_"): v for k, v in vals.items()}
                )
        mlflow.log_artifact(metrics)
    for name, per_split in results.items():
        for s, vals in per_split.items():
            log.info(
                "%s on %s: oIoU %.3f mIoU %.3f mAP %.3f",
                name,
                s,
                vals["oiou"],
                vals["miou"],
                vals["map"],
            )
