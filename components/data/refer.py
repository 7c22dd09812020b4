"""Referring datasets on disk -> the sample schema: the REFER family (RefCOCO, RefCOCO+,
RefCOCOg) and Ref-ZOM (DMMI's zero / one / many benchmark).

On-disk layout (the REFER tools' own): ``<root>/<dataset>/refs(<split_by>).p`` and
``<root>/<dataset>/instances.json`` (COCO style), images under ``data.image_dir``. Every
(ref, sentence) pair is one sample; its mask is the referred object's (Ref-ZOM: the union of the
referred objects, empty for a one-to-zero ref); its image file comes from ``instances.json``
(a ref's own ``file_name`` carries an ``_<ann_id>`` suffix that names no file).

The refs pickle is untrusted input: :func:`load_refs` admits builtin containers and scalars only
and refuses anything else by name, never running code from the file.

This module reads and checks the annotation files; ``components.data.convert`` turns
:class:`RefSample` lists into rows of the schema (masks decoded, images read, superpixels
computed), one shard per Ray task.
"""

from __future__ import annotations

import io
import json
import pickle
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from components.data.schema import DataError, skip_reason

#: dataset -> its usual ``split_by`` and, per ``split_by``, the dataset's split names that make
#: the product's train / val / test. A split "holdout" is a fixed 5 % of the train images (by
#: image id), removed from train: for datasets that ship no val split.
DATASETS: dict[str, dict] = {
    "refcoco": {
        "split_by": "unc",
        "splits": {
            "unc": {"train": ["train"], "val": ["val"], "test": ["testA", "testB"]},
            "google": {"train": ["train"], "val": ["val"], "test": ["test"]},
        },
    },
    "refcoco+": {
        "split_by": "unc",
        "splits": {"unc": {"train": ["train"], "val": ["val"], "test": ["testA", "testB"]}},
    },
    "refcocog": {
        "split_by": "umd",
        "splits": {
            # (the Google split ships no test split: not offered)
            "umd": {"train": ["train"], "val": ["val"], "test": ["test"]},
        },
    },
    "refzom": {
        "split_by": "final",
        "splits": {"final": {"train": ["train"], "val": ["holdout"], "test": ["test"]}},
    },
}
HOLDOUT_PERCENT = 5


def split_by_of(dataset: str, split_by: str | None) -> str:
    """``split_by`` or the dataset's usual one; raises ValueError for an unknown pair."""
    info = DATASETS[dataset]
    chosen = split_by or info["split_by"]
    if chosen not in info["splits"]:
        raise ValueError(
            f"{dataset} has no split_by {chosen!r} (one of {', '.join(info['splits'])})"
        )
    return chosen


# --------------------------------------------------------------------------- the pickle
_SAFE_GLOBALS = {
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("__builtin__", "set"),  # Python 2 pickles
    ("__builtin__", "frozenset"),
}


class _RefsUnpickler(pickle.Unpickler):
    """Unpickles builtin containers and scalars only: a global of any other kind (the way a
    pickle runs code) is refused before it is imported."""

    def __init__(self, fh, path: Path):
        super().__init__(fh, encoding="utf-8", errors="replace")
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) in _SAFE_GLOBALS:
            return set if name == "set" else frozenset
        raise DataError(
            f"{self.path}: refused to unpickle {module}.{name}: a refs file holds builtin "
            "containers and scalars only"
        )


def load_refs(path: Path) -> list[dict]:
    """The refs list of a REFER-style pickle, safely (see :class:`_RefsUnpickler`).

    Raises:
        DataError: naming the file when it is missing, refuses a class, is not a pickle, or
            is not a list of refs with the keys every ref has.
    """
    if not path.is_file():
        raise DataError(f"{path}: refs file not found")
    try:
        refs = _RefsUnpickler(io.BytesIO(path.read_bytes()), path).load()
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 -- any unpickling failure is bad data
        raise DataError(
            f"{path}: not a readable refs pickle ({type(err).__name__}: {err})"
        ) from None
    if not isinstance(refs, list):
        raise DataError(f"{path}: expected a list of refs, got {type(refs).__name__}")
    for i, ref in enumerate(refs):
        missing = [
            k for k in ("ref_id", "ann_id", "image_id", "split", "sentences") if k not in ref
        ]
        if not isinstance(ref, dict) or missing:
            raise DataError(f"{path}: ref #{i} lacks {', '.join(missing) or 'dict form'}")
    return refs


# --------------------------------------------------------------------------- instances.json
@dataclass(frozen=True)
class Instances:
    """What the converter reads from ``instances.json``."""

    images: dict[int, tuple[str, int, int]]  # image id -> (file_name, height, width)
    annotations: dict[int, dict]  # ann id -> {"image_id", "segmentation", "category_id"}
    categories: dict[int, int]  # COCO category id -> contiguous 1..K
    names: list[str]  # category names, index = contiguous id - 1


def load_instances(path: Path) -> Instances:
    if not path.is_file():
        raise DataError(f"{path}: instances file not found")
    try:
        coco = json.loads(path.read_text())
        images = {
            int(im["id"]): (im["file_name"], int(im["height"]), int(im["width"]))
            for im in coco["images"]
        }
        cats = sorted(coco["categories"], key=lambda c: int(c["id"]))
        anns = {
            int(a["id"]): {
                "image_id": int(a["image_id"]),
                "segmentation": a["segmentation"],
                "category_id": int(a["category_id"]),
            }
            for a in coco["annotations"]
        }
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(
            f"{path}: not a COCO instances file ({type(err).__name__}: {err})"
        ) from None
    return Instances(
        images=images,
        annotations=anns,
        categories={int(c["id"]): i + 1 for i, c in enumerate(cats)},
        names=[c["name"] for c in cats],
    )


# --------------------------------------------------------------------------- masks
def annotation_rle(segmentation, height: int, width: int, where: str) -> dict:
    """One annotation's mask as a COCO RLE at the image's size, from polygons (a list of flat
    ``[x1, y1, x2, y2, ...]`` lists) or RLE (compressed or uncompressed counts).

    Raises:
        DataError: ``where`` names file and id: a malformed polygon (odd length, under three
            points, a non-finite coordinate), a polygon outside its image (by over one pixel),
            an RLE whose size is not the image's.
    """
    if isinstance(segmentation, list):
        if not segmentation:
            raise DataError(f"{where}: empty polygon list")
        for poly in segmentation:
            coords = np.asarray(poly, dtype=np.float64) if isinstance(poly, list) else None
            if coords is None or coords.ndim != 1 or len(coords) % 2 or len(coords) < 6:
                raise DataError(f"{where}: malformed polygon (needs x, y pairs, >= 3 points)")
            if not np.isfinite(coords).all():
                raise DataError(f"{where}: polygon has a non-finite coordinate")
            xs, ys = coords[0::2], coords[1::2]
            if xs.min() < -1 or ys.min() < -1 or xs.max() > width + 1 or ys.max() > height + 1:
                raise DataError(
                    f"{where}: polygon outside its {width}x{height} image (x {xs.min():.1f}.."
                    f"{xs.max():.1f}, y {ys.min():.1f}..{ys.max():.1f})"
                )
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        if [int(s) for s in segmentation["size"]] != [height, width]:
            raise DataError(
                f"{where}: RLE size {segmentation['size']} is not the image's {[height, width]}"
            )
        counts = segmentation["counts"]
        rle = (
            mask_utils.frPyObjects(segmentation, height, width)
            if isinstance(counts, list)
            else {
                "size": [height, width],
                "counts": counts.encode() if isinstance(counts, str) else counts,
            }
        )
    else:
        raise DataError(f"{where}: segmentation is neither polygons nor RLE")
    counts = rle["counts"]
    return {
        "size": [height, width],
        "counts": counts.decode() if isinstance(counts, bytes) else counts,
    }


# --------------------------------------------------------------------------- samples
@dataclass(frozen=True)
class RefSample:
    """One (ref, sentence) pair, checked, before its image is read."""

    sample_id: str
    image_id: str
    split: str  # the product's train / val / test
    file: str  # image path as stored: relative to data.root, or absolute
    height: int
    width: int
    query: str
    query_type: str  # one / many / zero
    segmentations: tuple  # instances.json segmentation of each referred object (empty: zero)
    categories: tuple[int, ...]  # contiguous ids of the referred objects
    where: str = field(default="", compare=False)  # refs file and ids, for error messages


def _holdout(image_id: int) -> bool:
    return zlib.crc32(str(image_id).encode()) % 100 < HOLDOUT_PERCENT


def _product_split(ref_split: str, image_id: int, table: dict[str, list[str]]) -> str | None:
    """The product split (train / val / test) of a ref, or None for a split the table skips."""
    if ref_split == "train" and _holdout(image_id) and any("holdout" in v for v in table.values()):
        ref_split = "holdout"
    return next((name for name, wanted in table.items() if ref_split in wanted), None)


def _ann_ids(ref: dict) -> list[int]:
    ann = ref["ann_id"]
    if isinstance(ann, list | tuple):
        return [int(a) for a in ann]
    return [] if ann is None else [int(ann)]


def refer_samples(
    root: Path,
    dataset: str,
    split_by: str | None,
    image_dir: str,
    skipped: dict[str, int],
    on_bad_sample: str = "error",
) -> tuple[list[RefSample], Instances]:
    """Every (ref, sentence) sample of ``<root>/<dataset>`` with its product split.

    A bad ref (an annotation or image id ``instances.json`` lacks, a malformed or
    out-of-image polygon, a referred object in another image) raises ``DataError`` naming the
    file and ids, or with ``on_bad_sample="skip"`` is counted in ``skipped`` by reason.
    """
    split_by = split_by_of(dataset, split_by)
    table = DATASETS[dataset]["splits"][split_by]
    folder = Path(root) / dataset
    refs_path = folder / f"refs({split_by}).p"
    refs = load_refs(refs_path)
    inst = load_instances(folder / "instances.json")
    samples: list[RefSample] = []
    for ref in refs:
        where = f"{refs_path}: ref {ref['ref_id']}"
        try:
            samples += _ref_samples(ref, dataset, inst, table, image_dir, where)
        except DataError as err:
            if on_bad_sample == "error":
                raise
            reason = skip_reason(err)
            skipped[reason] = skipped.get(reason, 0) + max(1, len(ref.get("sentences") or []))
    return samples, inst


def _ref_samples(ref, dataset, inst: Instances, table, image_dir, where) -> list[RefSample]:
    image_id = int(ref["image_id"])
    split = _product_split(str(ref["split"]), image_id, table)
    if split is None:
        return []
    if image_id not in inst.images:
        raise DataError(f"{where}: image {image_id} is not in instances.json")
    file_name, h, w = inst.images[image_id]
    zero = ref.get("source") == "zero"  # Ref-ZOM's one-to-zero refs
    segs, cats = [], []
    for ann_id in [] if zero else _ann_ids(ref):
        ann = inst.annotations.get(ann_id)
        if ann is None:
            raise DataError(f"{where}: annotation {ann_id} is not in instances.json")
        if ann["image_id"] != image_id:
            raise DataError(f"{where}: annotation {ann_id} belongs to image {ann['image_id']}")
        if ann["category_id"] not in inst.categories:
            raise DataError(
                f"{where}: annotation {ann_id} has unknown category {ann['category_id']}"
            )
        segs.append((ann_id, ann["segmentation"]))
        cats.append(inst.categories[ann["category_id"]])
    if not zero and not segs:
        raise DataError(f"{where}: refers to no annotation")
    kind = "zero" if zero else ("many" if len(segs) > 1 else "one")
    out = []
    for k, sent in enumerate(ref["sentences"]):
        text = (sent.get("sent") or sent.get("raw") or "") if isinstance(sent, dict) else ""
        sent_id = sent.get("sent_id", k) if isinstance(sent, dict) else k
        if not text.strip():
            raise DataError(f"{where}: sentence {sent_id} is empty")
        out.append(
            RefSample(
                sample_id=f"{dataset}-{ref['ref_id']}-{sent_id}",
                image_id=f"{dataset}-{image_id}",
                split=split,
                file=str(Path(image_dir) / file_name),
                height=h,
                width=w,
                query=text.strip(),
                query_type=kind,
                segmentations=tuple(segs),
                categories=tuple(cats),
                where=f"{where}, sentence {sent_id}",
            )
        )
    return out
