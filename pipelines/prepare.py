"""Stage ``prepare``: the embedded cross-domain benchmark, or a dataset pair on disk
(``data.dataset`` -> ``data.target_dataset``: a referring pair such as RefCOCO -> RefCOCO+, or
a semantic one such as GTA5 -> Cityscapes), as Parquet shards in the sample schema.

Each shard (a contiguous range of samples of one domain/split) is one Ray task that renders or
converts its samples and computes their SLIC superpixels, so the work spreads over every core
or cluster node. The driver writes shards into a temporary folder renamed into place at the end.
A dataset on disk is converted resumably: shards land in ``.<out>.partial/`` as they finish and
a re-run after a failure converts only the missing ones (same params and annotation files).

Outputs (under ``--out``): ``<domain>/<split>/part-NNNNN.parquet`` in the sample schema,
``vocab.json`` (words of the *training* queries of both domains; target queries are unlabeled
data the adaptation may read) and ``stats.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sys
from collections import Counter
from pathlib import Path

import mlflow
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from tqdm import tqdm

from components.config import SEMANTIC_DATASETS, VIDEO_DATASETS, DataConfig, Params
from components.data.cityscapes import classes_for, semantic_samples
from components.data.convert import merge_summaries, sample_rows, shard_summary, superpixels
from components.data.refer import refer_samples
from components.data.schema import SAMPLE_SCHEMA, DataError, encode_png, encode_rle, write_shard
from components.data.synthetic import CATEGORIES, generate_range
from components.data.video import a2d_samples, jhmdb_samples
from components.data.vocab import Vocab
from components.io import atomic_path, fingerprint, write_json
from components.runtime import init_ray
from components.stage_io import CLASSES_FILE
from components.tracking import stage_run
from pipelines.common import repo_root

log = logging.getLogger(__name__)


def _no_bar() -> bool:
    """No shard progress bar where it cannot redraw (DVC's log, CI): the stage's summary line
    says what was converted."""
    return not sys.stderr.isatty()


SPLITS = [
    ("source", "train"),
    ("source", "val"),
    ("target", "train"),
    ("target", "val"),
    ("target", "test"),
]


def make_rows(cfg: DataConfig, seed: int, domain: str, split: str, start: int, stop: int):
    rows, regions = [], {}  # superpixels once per image
    for s in generate_range(cfg, seed, domain, split, start, stop):
        h, w = s["semantic"].shape
        if s["image_id"] not in regions:
            regions = {s["image_id"]: encode_png(superpixels(s["image"], cfg))}
        rows.append(
            {
                "sample_id": s["sample_id"],
                "image_id": s["image_id"],
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
                "superpixels_png": regions[s["image_id"]],
            }
        )
    return pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA)


@ray.remote(num_cpus=1)
def _make_shard(cfg: DataConfig, seed: int, domain: str, split: str, start: int, stop: int):
    return make_rows(cfg, seed, domain, split, start, stop)


def run(params: Params, out: Path) -> dict:
    """Generate (or convert) every split into ``out`` (atomically); returns the statistics."""
    if params.data.on_disk:
        return run_on_disk(params, out)
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
        bar = tqdm(total=len(pending), desc="prepare: shards", unit="shard", disable=_no_bar())
        with bar:
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


@ray.remote(num_cpus=1)
def _convert_shard(samples, domain: str, cfg: DataConfig, on_bad_sample: str, classes: tuple):
    root = Path(cfg.root)
    table, skipped, error = sample_rows(samples, domain, cfg, root, on_bad_sample, classes)
    return table, skipped, error, shard_summary(table)


def _dataset_samples(cfg: DataConfig, domain: str, skipped: dict, on_bad: str):
    """``(samples, class names, annotation files, listing)`` of a domain's dataset on disk;
    ``listing`` keys the resumable conversion where no annotation file lists the samples."""
    root = Path(cfg.root)
    if domain == "source":
        dataset, split_by, image_dir = cfg.dataset, cfg.split_by, cfg.image_dir
    else:
        dataset, split_by = cfg.target_domain, cfg.target_split_by
        image_dir = cfg.target_image_dir or cfg.image_dir
    if dataset in SEMANTIC_DATASETS:
        samples = semantic_samples(root, dataset, skipped, on_bad)
        names = list(classes_for({cfg.dataset, cfg.target_domain}))
        return samples, names, [], _listing(root, samples, "label")
    if dataset in VIDEO_DATASETS:
        reader = a2d_samples if dataset == "a2d" else jhmdb_samples
        samples = reader(root, cfg.clip_frames, skipped, on_bad)
        folder = root / dataset
        files = [folder / "Release/videoset.csv", folder / "text_annotations/a2d_annotation.txt"]
        if dataset == "jhmdb":
            files = [folder / "jhmdb_annotation.txt"]
        return samples, ["background"], files, _listing(root, samples, "mask_file")
    samples, inst = refer_samples(root, dataset, split_by, image_dir, skipped, on_bad)
    files = sorted((root / dataset).glob("refs(*).p")) + [root / dataset / "instances.json"]
    return samples, ["background", *inst.names], files, []


def _listing(root: Path, samples, label: str) -> list:
    """What keys a resumable conversion where no annotation file lists the samples: each
    sample's id, split, files, and its label file's size and modification time (a label
    replaced after a failure, or a changed split rule, starts the conversion afresh)."""
    out, seen = [], {}
    for s in samples:
        path = getattr(s, label)
        if path not in seen:
            st = (root / path).stat() if (root / path).exists() else None
            seen[path] = [st.st_size, st.st_mtime_ns] if st else None
        out.append([s.sample_id, s.split, s.file, path, seen[path]])
    return out


def run_on_disk(params: Params, out: Path) -> dict:
    """Convert ``data.dataset`` (source) and ``data.target_domain`` (target) into ``out``.

    Memory: the driver holds the sample lists of both datasets (a referring one's refs and
    annotation index, about the size of its annotation files; a semantic one's file names) and
    at most ``2 x CPUs`` finished shards in flight; each task one shard (see
    ``components.data.convert``), whatever the dataset's size.

    Raises:
        DataError: a missing root or file, or a bad sample under ``on_bad_sample: error``
            (naming file and id).
    """
    cfg, on_bad = params.data, params.prepare.on_bad_sample
    root = Path(cfg.root)
    if not root.is_dir():
        raise DataError(f"data.root {root}: no such folder")
    domains = {"source": ("train", "val"), "target": ("train", "val", "test")}
    jobs, skipped, inputs, listing, names = [], {}, [], [], None
    for domain, splits in domains.items():
        skipped[domain] = {}
        samples, classes, files, files_listed = _dataset_samples(
            cfg, domain, skipped[domain], on_bad
        )
        names = names or classes  # the source's (a pair shares its classes)
        inputs += files
        listing += files_listed
        dataset = cfg.dataset if domain == "source" else cfg.target_domain
        for split in splits:
            rows = [s for s in samples if s.split == split]
            if not rows:
                raise DataError(f"{root / dataset}: no samples in the {split} split")
            for part, start in enumerate(range(0, len(rows), cfg.shard_size)):
                jobs.append((domain, split, part, rows[start : start + cfg.shard_size]))
    listed = hashlib.sha256(json.dumps(listing).encode()).hexdigest()
    key = fingerprint(
        sorted(set(inputs)),
        {
            "seed": params.seed,
            "data": cfg.model_dump(mode="json"),
            "on_bad": on_bad,
            "files": listed,
        },
    )
    partial = out.parent / f".{out.name}.partial"
    _reset_partial(partial, key)
    init_ray(params.runtime)
    pending, in_flight = [j for j in jobs if not _shard_file(partial, *j[:3]).is_file()], {}
    if len(pending) < len(jobs):
        log.info(
            "prepare: resuming, %d of %d shards already converted",
            len(jobs) - len(pending),
            len(jobs),
        )
    window = max(2, 2 * int(ray.available_resources().get("CPU", 1)))
    with tqdm(total=len(pending), desc="prepare: shards", unit="shard", disable=_no_bar()) as bar:
        while pending or in_flight:
            while pending and len(in_flight) < window:
                job = pending.pop(0)
                ref = _convert_shard.remote(job[3], job[0], cfg, on_bad, tuple(names))
                in_flight[ref] = job
            done, _ = ray.wait(list(in_flight), num_returns=1)
            domain, split, part, _ = in_flight.pop(done[0])
            table, shard_skips, error, summary = ray.get(done[0])
            if error:
                raise DataError(error)
            path = _shard_file(partial, domain, split, part)
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path.with_suffix(".json")) as tmp:
                tmp.write_text(json.dumps({"summary": summary, "skipped": shard_skips}) + "\n")
            with atomic_path(path) as tmp:  # written last: its presence marks the shard done
                write_shard(table, tmp)
            bar.update(1)
    return _finish_on_disk(partial, out, jobs, skipped, names, cfg.dataset in SEMANTIC_DATASETS)


def _shard_file(partial: Path, domain: str, split: str, part: int) -> Path:
    return partial / domain / split / f"part-{part:05d}.parquet"


def _reset_partial(partial: Path, key: str) -> None:
    """Keep a partial conversion made with the same inputs and params; drop any other."""
    marker = partial / "KEY"
    if partial.is_dir() and (not marker.is_file() or marker.read_text().strip() != key):
        shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    marker.write_text(key + "\n")


def _finish_on_disk(
    partial: Path, out: Path, jobs, skipped: dict, names: list[str], semantic: bool
) -> dict:
    """Vocab, classes, statistics; then the partial folder becomes ``out``."""
    stats, train_queries = {}, []
    splits = sorted({(d, s) for d, s, _, _ in jobs})
    for domain, split in splits:
        parts, skips = [], dict(skipped[domain]) if split == "train" else {}
        for d, s, part, _ in jobs:
            if (d, s) == (domain, split):
                side = json.loads(_shard_file(partial, d, s, part).with_suffix(".json").read_text())
                parts.append(side["summary"])
                for k, v in side["skipped"].items():
                    skips[k] = skips.get(k, 0) + v
                if split == "train":
                    shard = pq.read_table(_shard_file(partial, d, s, part), columns=["query"])
                    train_queries += shard.column("query").to_pylist()
        stats[f"{domain}_{split}"] = merge_summaries(parts, skips, names if semantic else None)
    for side in partial.glob("*/*/*.json"):
        side.unlink()
    (partial / "KEY").unlink()
    Vocab.build(train_queries).save(partial / "vocab.json")
    (partial / CLASSES_FILE).write_text(json.dumps(names) + "\n")
    (partial / "stats.json").write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n")
    if out.is_dir():
        shutil.rmtree(out)
    partial.replace(out)
    return stats


def _accumulate(stats: dict, key: str, table: pa.Table) -> None:
    s = stats.setdefault(
        key, {"n": 0, "types": Counter(), "categories": Counter(), "images": set()}
    )
    s["n"] += table.num_rows
    s["types"].update(table.column("query_type").to_pylist())
    seen = set()  # an image's objects count once (the rows of an image repeat them)
    for image, cats in zip(
        table.column("image_id").to_pylist(),
        table.column("instance_categories").to_pylist(),
        strict=True,
    ):
        if image not in seen and image not in s["images"]:
            s["categories"].update(cats)
        seen.add(image)
    s["images"] |= seen


def _finish(s: dict) -> dict:
    total = max(1, sum(s["categories"].values()))
    return {
        "n": s["n"],
        "images": len(s["images"]),
        "queries_per_image": s["n"] / max(1, len(s["images"])),
        "query_types": {k: v / s["n"] for k, v in sorted(s["types"].items())},
        "category_freq": {str(k): v / total for k, v in sorted(s["categories"].items())},
    }


def _metric(split: dict) -> dict:
    """A split's DVC metrics: its size in queries and images, and for a dataset on disk its
    summary's numbers."""
    out = {"n": split["n"], "images": split["images"]}
    if "queries_per_image" in split:
        out["queries_per_image"] = split["queries_per_image"]
    if "skipped" in split:
        out["expressions_per_image"] = split["expressions_per_image"]["mean"]
        out.update({f"{k}_queries": v for k, v in split["query_types"].items()})
        out["skipped"] = sum(split["skipped"].values())
    return out


def main(params: Params, out: str, metrics: str | None = None) -> None:
    used = {
        "seed": params.seed,
        "data": params.data.model_dump(mode="json"),
        "prepare": params.prepare.model_dump(mode="json"),
    }
    with stage_run("prepare", params.runtime, used, repo_root()):
        stats = run(params, Path(out))
        mlflow.log_metrics({f"n_{k}": v["n"] for k, v in stats.items()})
        mlflow.log_dict(stats, "stats.json")
    if metrics:
        write_json(metrics, {k: _metric(v) for k, v in stats.items()})
    log.info("prepared %d samples into %s", sum(v["n"] for v in stats.values()), out)
