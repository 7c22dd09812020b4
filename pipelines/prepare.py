"""Stage ``prepare``: generate the embedded cross-domain benchmark as Parquet shards.

Each shard (a contiguous range of sample indices of one domain/split) is one Ray task that
renders its samples and computes their SLIC superpixels, so the work spreads over every core
or cluster node. The driver writes shards into a temporary folder renamed into place at the end.

Outputs (under ``--out``): ``<domain>/<split>/part-NNNNN.parquet`` in the sample schema,
``vocab.json`` (words of the *training* queries of both domains; target queries are unlabeled
data the adaptation may read) and ``stats.json``.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import mlflow
import numpy as np
import pyarrow as pa
import ray
from skimage.segmentation import slic
from tqdm import tqdm

from components.config import DataConfig, Params
from components.data.schema import SAMPLE_SCHEMA, encode_png, encode_rle, write_shard
from components.data.synthetic import CATEGORIES, generate_sample
from components.data.vocab import Vocab
from components.io import atomic_path, write_json
from components.runtime import init_ray
from components.stage_io import CLASSES_FILE
from components.tracking import stage_run
from pipelines.common import repo_root

log = logging.getLogger(__name__)

SPLITS = [
    ("source", "train"),
    ("source", "val"),
    ("target", "train"),
    ("target", "val"),
    ("target", "test"),
]


def superpixels(image: np.ndarray, cfg: DataConfig) -> np.ndarray:
    """SLIC labels (H, W) uint8 starting at 0 (Achanta et al., via scikit-image)."""
    labels = slic(
        image,
        n_segments=cfg.slic_segments,
        compactness=cfg.slic_compactness,
        start_label=0,
        channel_axis=-1,
    )
    return np.minimum(labels, 255).astype(np.uint8)


def make_rows(cfg: DataConfig, seed: int, domain: str, split: str, start: int, stop: int):
    rows = []
    for i in range(start, stop):
        s = generate_sample(cfg, seed, domain, split, i)
        h, w = s["semantic"].shape
        rows.append(
            {
                "sample_id": s["sample_id"],
                "image_id": s["sample_id"],
                "domain": domain,
                "split": split,
                "height": h,
                "width": w,
                "image_png": encode_png(s["image"]),
                "query": s["query"],
                "query_type": s["query_type"],
                "n_targets": len(s["target_categories"]),
                "target_rle": encode_rle(s["target"]),
                "target_categories": s["target_categories"],
                "semantic_png": encode_png(s["semantic"]),
                "instance_rles": [encode_rle(m) for m in s["instances"]],
                "instance_categories": s["instance_categories"],
                "superpixels_png": encode_png(superpixels(s["image"], cfg)),
            }
        )
    return pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA)


@ray.remote(num_cpus=1)
def _make_shard(cfg: DataConfig, seed: int, domain: str, split: str, start: int, stop: int):
    return make_rows(cfg, seed, domain, split, start, stop)


def run(params: Params, out: Path) -> dict:
    """Generate every split into ``out`` (atomically); returns the dataset statistics."""
    cfg = params.data
    init_ray(params.runtime)
    jobs = {}
    for domain, split in SPLITS:
        n = getattr(cfg.splits, f"{domain}_{split}")
        for part, start in enumerate(range(0, n, cfg.shard_size)):
            stop = min(n, start + cfg.shard_size)
            ref = _make_shard.remote(cfg, params.seed, domain, split, start, stop)
            jobs[ref] = (domain, split, part)
    stats: dict = {}
    train_queries: list[str] = []
    with atomic_path(out, is_dir=True) as tmp:
        pending = list(jobs)
        with tqdm(total=len(pending), desc="prepare: shards", unit="shard") as bar:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                table = ray.get(done[0])
                domain, split, part = jobs[done[0]]
                folder = tmp / domain / split
                folder.mkdir(parents=True, exist_ok=True)
                write_shard(table, folder / f"part-{part:05d}.parquet")
                _accumulate(stats, f"{domain}_{split}", table)
                if split == "train":
                    train_queries += table.column("query").to_pylist()
                bar.update(1)
        Vocab.build(train_queries).save(tmp / "vocab.json")
        # the semantic task's classes: id = position in the list, 0 = background
        (tmp / CLASSES_FILE).write_text(json.dumps(["background", *CATEGORIES]) + "\n")
        stats = {k: _finish(v) for k, v in sorted(stats.items())}
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n")
    return stats


def _accumulate(stats: dict, key: str, table: pa.Table) -> None:
    s = stats.setdefault(key, {"n": 0, "types": Counter(), "categories": Counter()})
    s["n"] += table.num_rows
    s["types"].update(table.column("query_type").to_pylist())
    for cats in table.column("instance_categories").to_pylist():
        s["categories"].update(cats)


def _finish(s: dict) -> dict:
    total = max(1, sum(s["categories"].values()))
    return {
        "n": s["n"],
        "query_types": {k: v / s["n"] for k, v in sorted(s["types"].items())},
        "category_freq": {str(k): v / total for k, v in sorted(s["categories"].items())},
    }


def main(params: Params, out: str, metrics: str | None = None) -> None:
    used = {"seed": params.seed, "data": params.data.model_dump(mode="json")}
    with stage_run("prepare", params.runtime, used, repo_root()):
        stats = run(params, Path(out))
        mlflow.log_metrics({f"n_{k}": v["n"] for k, v in stats.items()})
        mlflow.log_dict(stats, "stats.json")
    if metrics:
        write_json(metrics, {k: {"n": v["n"]} for k, v in stats.items()})
    log.info("prepared %d samples into %s", sum(v["n"] for v in stats.values()), out)
