"""Rows of the sample schema from checked samples of a dataset on disk (one Ray task per shard
in ``pipelines.prepare``), and the dataset summary.

A referring shard's task decodes each referred object's mask (pycocotools, at the image's own
size), reads the image to check its size against the annotation file and to compute its SLIC
superpixels at ``data.image_size``, and keeps the image on disk by path unless
``data.embed_images``. A semantic shard's task (the Cityscapes family) reads each label file,
maps its ids to the pair's class indices and stores that map as a PNG at the image's own size
(the one thing converted, so it cannot stay by path). Memory of a task: one shard's rows
(``data.shard_size`` samples, each an RLE string or a label PNG and a superpixel PNG of
``image_size``^2 pixels) plus one decoded image and label at a time.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
from pycocotools import mask as mask_utils
from skimage.segmentation import slic

from components.config import DataConfig
from components.data.cityscapes import SemanticSample, read_label
from components.data.refer import RefSample, annotation_rle
from components.data.schema import (
    SAMPLE_SCHEMA,
    DataError,
    decode_png,
    decode_rle,
    encode_png,
    encode_rle,
    read_image,
    resize,
    skip_reason,
)
from components.data.video import VideoSample, video_mask

#: upper edges of the mask-area histogram (share of the image the referred mask covers)
AREA_BINS = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0)


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


def union_rle(rles: list[dict], height: int, width: int) -> dict:
    """The union of objects' RLEs (an empty mask for none), as a str-counts RLE."""
    if not rles:
        empty = mask_utils.encode(np.zeros((height, width), dtype=np.uint8, order="F"))
        return {"size": [height, width], "counts": empty["counts"].decode()}
    coco = [{"size": r["size"], "counts": r["counts"].encode()} for r in rles]
    merged = mask_utils.merge(coco) if len(coco) > 1 else coco[0]
    counts = merged["counts"]
    return {
        "size": [height, width],
        "counts": counts.decode() if isinstance(counts, bytes) else counts,
    }


def sample_rows(
    samples: list[RefSample] | list[SemanticSample] | list[VideoSample],
    domain: str,
    cfg: DataConfig,
    root: Path,
    on_bad_sample: str,
    classes: tuple[str, ...] = (),
) -> tuple[pa.Table, dict[str, int], str | None]:
    """One shard: ``(table, skipped reasons -> counts, error)``; ``error`` (a message naming
    file and sample id) is set, and the table empty, when a bad sample meets
    ``on_bad_sample="error"``. ``classes``: a semantic dataset's class list."""
    rows, skipped = [], Counter()
    image_cache: dict[str, tuple] = {}  # the consecutive sentences of a ref share an image
    mask_cache: dict[tuple, dict] = {}
    for s in samples:
        try:
            if isinstance(s, SemanticSample):
                rows.append(_semantic_row(s, domain, cfg, root, classes))
            elif isinstance(s, VideoSample):
                rows.append(_video_row(s, domain, cfg, root, image_cache))
            else:
                rows.append(_row(s, domain, cfg, root, image_cache, mask_cache))
        except DataError as err:
            if on_bad_sample == "error":
                return pa.Table.from_pylist([], schema=SAMPLE_SCHEMA), {}, str(err)
            skipped[skip_reason(err)] += 1
    return pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA), dict(skipped), None


def _read_checked(s: RefSample | SemanticSample | VideoSample, root: Path) -> np.ndarray:
    path = Path(root) / s.file
    if not path.is_file():
        raise DataError(f"{s.where}: {path}: image file not found")
    try:
        return read_image(path)
    except OSError as err:
        raise DataError(f"{s.where}: {path}: corrupt image ({err})") from None


def _semantic_row(s: SemanticSample, domain, cfg: DataConfig, root: Path, classes) -> dict:
    image = _read_checked(s, root)
    h, w = image.shape[:2]
    label = read_label(s, root, classes)
    if label.shape != (h, w):
        raise DataError(
            f"{s.where}: {Path(root) / s.label}: label size {label.shape[1]}x{label.shape[0]} "
            f"differs from the image's {w}x{h}"
        )
    small = resize(image, cfg.image_size, nearest=False)
    present = np.unique(label)
    return {
        "sample_id": s.sample_id,
        "image_id": s.sample_id,
        "domain": domain,
        "split": s.split,
        "height": h,
        "width": w,
        "image_png": encode_png(image) if cfg.embed_images else b"",
        "image_path": None if cfg.embed_images else s.file,
        "query": "",
        "query_type": "none",
        "n_targets": 0,
        "target_rle": union_rle([], h, w),
        "target_categories": [],
        "semantic_png": encode_png(label),
        "instance_rles": [],
        "instance_categories": [int(c) for c in present if c != 255],
        "superpixels_png": encode_png(superpixels(small, cfg)),
    }


def _video_row(s: VideoSample, domain, cfg: DataConfig, root: Path, image_cache) -> dict:
    """A video frame: its queries share the frame's read and superpixels."""
    if s.file not in image_cache:
        image_cache.clear()
        image = _read_checked(s, root)
        small = resize(image, cfg.image_size, nearest=False)
        png = encode_png(image) if cfg.embed_images else b""
        image_cache[s.file] = (png, encode_png(superpixels(small, cfg)), image.shape[:2])
    png, sp_png, (h, w) = image_cache[s.file]
    mask = video_mask(s, root)
    if mask.shape != (h, w):
        raise DataError(
            f"{s.where}: {Path(root) / s.mask_file}: mask size {mask.shape[1]}x{mask.shape[0]} "
            f"differs from the frame's {w}x{h}"
        )
    n = int(mask.any())
    return {
        "sample_id": s.sample_id,
        "image_id": s.image_id,
        "domain": domain,
        "split": s.split,
        "height": h,
        "width": w,
        "image_png": png,
        "image_path": None if cfg.embed_images else s.file,
        "query": s.query,
        "query_type": "one" if n else "zero",
        "n_targets": n,
        "target_rle": encode_rle(mask),
        "target_categories": [],
        "semantic_png": b"",
        "instance_rles": [],
        "instance_categories": [],
        "superpixels_png": sp_png,
        "clip_paths": list(s.clip),
    }


def _row(s: RefSample, domain, cfg: DataConfig, root: Path, image_cache, mask_cache) -> dict:
    if s.file not in image_cache:
        image_cache.clear()
        image = _read_checked(s, root)
        path = Path(root) / s.file
        if image.shape[:2] != (s.height, s.width):
            raise DataError(
                f"{s.where}: {path}: image size differs from the annotation file's "
                f"({image.shape[1]}x{image.shape[0]}, not {s.width}x{s.height})"
            )
        small = resize(image, cfg.image_size, nearest=False)
        png = encode_png(image) if cfg.embed_images else b""
        image_cache[s.file] = (png, encode_png(superpixels(small, cfg)))
    png, sp_png = image_cache[s.file]
    key = tuple(a for a, _ in s.segmentations)
    if key not in mask_cache:
        rles = [
            annotation_rle(seg, s.height, s.width, f"{s.where}, annotation {a}")
            for a, seg in s.segmentations
        ]
        mask_cache[key] = union_rle(rles, s.height, s.width)
    return {
        "sample_id": s.sample_id,
        "image_id": s.image_id,
        "domain": domain,
        "split": s.split,
        "height": s.height,
        "width": s.width,
        "image_png": png,
        "image_path": None if cfg.embed_images else s.file,
        "query": s.query,
        "query_type": s.query_type,
        "n_targets": len(s.segmentations),
        "target_rle": mask_cache[key],
        "target_categories": list(s.categories),
        "semantic_png": b"",
        "instance_rles": [],
        "instance_categories": list(s.categories),
        "superpixels_png": sp_png,
    }


# --------------------------------------------------------------------------- summary
def shard_summary(table: pa.Table) -> dict:
    """The additive summary of one shard (merge with :func:`merge_summaries`)."""
    types = Counter(table.column("query_type").to_pylist())
    per_image = Counter(table.column("image_id").to_pylist())
    areas = np.zeros(len(AREA_BINS), dtype=np.int64)  # bin 0: empty masks
    for rle in table.column("target_rle").to_pylist():
        share = float(decode_rle(rle).mean())
        areas[0 if share == 0 else int(np.searchsorted(AREA_BINS, share))] += 1
    cats = Counter(c for cs in table.column("target_categories").to_pylist() for c in cs)
    pixels = np.zeros(256, dtype=np.int64)  # per class index of a semantic map (255: ignore)
    for data in table.column("semantic_png").to_pylist():
        if data:
            pixels += np.bincount(decode_png(data).ravel(), minlength=256)
    return {
        "n": table.num_rows,
        "query_types": dict(types),
        "expressions_per_image": {k: v for k, v in per_image.items()},
        "mask_area": areas.tolist(),
        "categories": {str(k): v for k, v in cats.items()},
        "class_pixels": {str(k): int(v) for k, v in enumerate(pixels) if v},
    }


def merge_summaries(
    parts: list[dict], skipped: dict[str, int], classes: list[str] | None = None
) -> dict:
    """One split's summary from its shards' (an image's expressions may span shards);
    ``classes`` names a semantic dataset's class indices for its pixel shares."""
    types, per_image, cats, pixels = Counter(), Counter(), Counter(), Counter()
    areas = np.zeros(len(AREA_BINS), dtype=np.int64)
    for p in parts:
        types.update(p["query_types"])
        per_image.update(p["expressions_per_image"])
        cats.update(p["categories"])
        pixels.update(p.get("class_pixels", {}))
        areas += np.asarray(p["mask_area"])
    n = sum(p["n"] for p in parts)
    counts = list(per_image.values()) or [0]
    labels = ["empty"] + [f"<={hi:g}" for hi in AREA_BINS[1:]]
    total_cats = max(1, sum(cats.values()))
    labeled = max(1, sum(v for k, v in pixels.items() if k != "255"))
    semantic = {}
    if pixels:  # share of the labeled pixels per class; ignored pixels as a share of all
        semantic["class_pixel_share"] = {
            (classes[int(k)] if classes and int(k) < len(classes) else k): v / labeled
            for k, v in sorted(pixels.items(), key=lambda x: int(x[0]))
            if k != "255"
        }
        semantic["ignored_pixel_share"] = pixels.get("255", 0) / max(1, sum(pixels.values()))
    return {
        "n": n,
        "images": len(per_image),
        "expressions_per_image": {"mean": float(np.mean(counts)), "max": int(max(counts))},
        "query_types": {k: types.get(k, 0) for k in ("zero", "one", "many")},
        "mask_area_histogram": dict(zip(labels, areas.tolist(), strict=True)),
        "category_freq": {
            k: v / total_cats for k, v in sorted(cats.items(), key=lambda x: int(x[0]))
        },
        **semantic,
        "skipped": dict(sorted(skipped.items())),
    }
