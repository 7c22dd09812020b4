"""Stage ``evaluate``: every trained model on every evaluation split, with its task's metrics.

Each (model, split) pair is one Ray task (local cores or cluster nodes). Outputs:

* ``metrics/eval.json``: model -> split -> metric (referring: oiou, miou, map, prec@K,
  zero_acc, n over all queries, then DMMI's layout by query type: one/…, many/…, targets/…
  (oiou, miou, n), zero/acc, zero/n; semantic: miou, pixel_acc, iou/<class>, n);
* ``predictions/<model>/<split>.parquet``: referring: sample_id, predicted COCO RLE, score,
  IoU; semantic: sample_id, predicted label map (PNG), mean confidence, pixel accuracy; so
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
from components.data.dataset import SplitArrays
from components.data.schema import PREDICTION_SCHEMA, encode_png, encode_rle
from components.data.vocab import Vocab
from components.io import atomic_path, write_json
from components.metrics import mask_iou_stats
from components.models.network import load_trained
from components.plots import overlay_grid
from components.runtime import init_ray
from components.stage_io import load_task_split
from components.tasks import Task
from components.tracking import stage_run
from pipelines.common import repo_root

SEMANTIC_PREDICTION_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("pred_png", pa.binary()),  # uint8 class map
        ("score", pa.float32()),  # mean max-probability
        ("pixel_acc", pa.float32()),  # against the ground truth (ignore excluded)
    ]
)

log = logging.getLogger(__name__)


def split_parts(name: str) -> tuple[str, str]:
    domain, split = name.split("_")
    return domain, split


@ray.remote(num_cpus=1)
def _predict_task(task: Task, model, data: SplitArrays, batch_size: int):
    torch.set_num_threads(1)
    return task.predict(model, data, batch_size, torch.device("cpu"))


def run(params: Params, data_dir: Path, model_dirs: list[Path]):
    """Returns ({model: {split: metrics}}, {(model, split): (preds, scores, data, task)}).

    Each model is evaluated with the task it was trained for (its ``model.json``): masks for
    the referring task, label maps for the semantic task.
    """
    vocab = Vocab.load(data_dir / "vocab.json")
    init_ray(params.runtime)
    splits: dict[tuple[str, str], tuple[SplitArrays, ray.ObjectRef]] = {}
    jobs = {}
    for folder in model_dirs:
        model, info = load_trained(folder)
        task = info["task_obj"]
        model_ref = ray.put(model)
        for s in params.evaluate.splits:
            if (task.name, s) not in splits:
                data = load_task_split(params, data_dir, *split_parts(s), task, vocab)
                splits[(task.name, s)] = (data, ray.put(data))
            data_ref = splits[(task.name, s)][1]
            job = _predict_task.remote(task, model_ref, data_ref, params.evaluate.batch_size)
            jobs[(folder.name, s)] = (job, task)
    results, outputs = {}, {}
    for (name, s), (ref, task) in jobs.items():
        preds, scores = ray.get(ref)
        data = splits[(task.name, s)][0]
        results.setdefault(name, {})[s] = task.metrics(preds, scores, data)
        outputs[(name, s)] = (preds, scores, data, task)
    return results, outputs


def write_semantic_predictions(path: Path, preds: np.ndarray, scores: np.ndarray, data):
    accs = []
    for p, g in zip(preds, data.labels, strict=True):
        keep = g != 255
        accs.append(float((p[keep] == g[keep]).mean()) if keep.any() else 1.0)
    table = pa.Table.from_pydict(
        {
            "sample_id": data.sample_ids,
            "pred_png": [encode_png(p) for p in preds],
            "score": scores.astype(np.float32),
            "pixel_acc": np.asarray(accs, dtype=np.float32),
        },
        schema=SEMANTIC_PREDICTION_SCHEMA,
    )
    pq.write_table(table, path)


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
            for (name, s), (preds, scores, split, task) in outputs.items():
                (tmp / name).mkdir(exist_ok=True)
                referring = task.name == "referring"
                write = write_predictions if referring else write_semantic_predictions
                write(tmp / name / f"{s}.parquet", preds, scores, split)
        n = params.evaluate.overlay_samples
        with atomic_path(overlays, is_dir=True) as tmp:
            for (name, s), (preds, _scores, split, task) in outputs.items():
                if s != "target_test" or n == 0:
                    continue
                # the semantic task is drawn as foreground (any class) vs background
                fg = preds[:n] if task.name == "referring" else preds[:n] > 0
                overlay_grid(
                    split.images[:n],
                    split.masks[:n],
                    fg,
                    split.queries[:n],
                    tmp / f"{name}.png",
                    f"{name} on {s}",
                )
        write_json(metrics, results)  # every DVC output first, then MLflow
        mlflow.log_artifacts(overlays, artifact_path="overlays")
        for name, per_split in results.items():
            for s, vals in per_split.items():
                mlflow.log_metrics(
                    {
                        f"{name}.{s}.{k}".replace("@", "_at_").replace("/", "."): v
                        for k, v in vals.items()
                    }
                )
        mlflow.log_artifact(metrics)
    for name, per_split in results.items():
        for s, vals in per_split.items():
            shown = {k: round(v, 3) for k, v in vals.items() if k in ("oiou", "miou", "map")}
            log.info("%s on %s: %s", name, s, shown or vals.get("miou"))
