"""The Cityscapes family on disk -> semantic samples: GTA5, SYNTHIA-RAND-CITYSCAPES, Cityscapes.

On-disk layouts (each dataset's public release), under ``<data.root>/<dataset>/``:

- ``gta5``: ``images/NNNNN.png`` and ``labels/NNNNN.png``, palette PNGs whose indices are
  Cityscapes label ids. The commonly distributed copy lacks a few of the official pairs: an
  image without a label (or a label without an image) is counted and reported, never fatal.
- ``synthia``: ``RGB/NNNNNNN.png`` and ``GT/LABELS/NNNNNNN.png``, 16-bit PNGs with the SYNTHIA
  class id in the first channel and an instance id in the second. Pillow reads a 16-bit RGB PNG
  as 8 bits and loses the ids, so these are read with ``pypng``, which keeps all 16 bits.
- ``cityscapes``: ``leftImg8bit/<split>/<city>/<name>_leftImg8bit.png`` with
  ``gtFine/<split>/<city>/<name>_gtFine_labelTrainIds.png``; where that file is absent (the
  release does not ship it), ``<name>_gtFine_labelIds.png`` is mapped, or, absent too, the
  train-id map is drawn from ``<name>_gtFine_polygons.json`` by ``cityscapesscripts`` (in
  memory: the dataset folder is never written to).

Classes: the 19 Cityscapes train classes, label id -> train id taken from the
``cityscapesscripts`` label table (never retyped), ignore index 255. A pair with SYNTHIA uses
its 16 shared classes (Cityscapes' terrain, truck and train become 255), and the semantic task
reports the 13-class mIoU* (without wall, fence, pole) next to the 16-class mIoU.

Splits: GTA5 and SYNTHIA ship no split the adaptation literature uses; all their pairs train, a
fixed 5 % of them (by file id) is the source val split; they serve as a source only.
Cityscapes: ``train`` minus a fixed 5 % hold-out is train, the hold-out is val, the official
``val`` (500 images, the split every paper reports) is test.
"""

from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import png
from cityscapesscripts.helpers.annotation import Annotation
from cityscapesscripts.helpers.labels import labels as CS_LABELS
from cityscapesscripts.helpers.labels import name2label
from cityscapesscripts.preparation.json2labelImg import createLabelImage
from PIL import Image

from components.data.schema import DataError, skip_or_raise

IGNORE = 255

#: the 19 Cityscapes train classes, index = train id (cityscapesscripts' table)
CITYSCAPES_CLASSES: tuple[str, ...] = tuple(
    lb.name for lb in sorted(CS_LABELS, key=lambda lb: lb.trainId) if 0 <= lb.trainId < IGNORE
)
#: SYNTHIA-RAND-CITYSCAPES class id -> the Cityscapes class it is (SYNTHIA's own table; its
#: parking-slot, road-work, terrain, truck, train and lane-marking are not among the 16)
SYNTHIA_TO_CITYSCAPES: dict[int, str] = {
    1: "sky",
    2: "building",
    3: "road",
    4: "sidewalk",
    5: "fence",
    6: "vegetation",
    7: "pole",
    8: "car",
    9: "traffic sign",
    10: "person",
    11: "bicycle",
    12: "motorcycle",
    15: "traffic light",
    17: "rider",
    19: "bus",
    21: "wall",
}
#: the 16 classes SYNTHIA shares with Cityscapes, in train-id order
SYNTHIA_CLASSES: tuple[str, ...] = tuple(
    c for c in CITYSCAPES_CLASSES if c in set(SYNTHIA_TO_CITYSCAPES.values())
)
#: the 13-class mIoU* of the SYNTHIA -> Cityscapes protocol
MIOU13_CLASSES: tuple[str, ...] = tuple(
    c for c in SYNTHIA_CLASSES if c not in ("wall", "fence", "pole")
)

HOLDOUT_PERCENT = 5


def classes_for(datasets: set[str]) -> tuple[str, ...]:
    """The class list of a domain pair: SYNTHIA's 16 when it takes part, else Cityscapes' 19."""
    return SYNTHIA_CLASSES if "synthia" in datasets else CITYSCAPES_CLASSES


def _lut(pairs: dict[int, str], classes: tuple[str, ...]) -> np.ndarray:
    """A 65536-entry lookup table: dataset id -> index in ``classes``, else 255."""
    lut = np.full(1 << 16, IGNORE, dtype=np.uint8)
    index = {c: i for i, c in enumerate(classes)}
    for k, name in pairs.items():
        if name in index:
            lut[k] = index[name]
    return lut


@functools.lru_cache(maxsize=8)  # per class list; callers only read it
def label_id_lut(classes: tuple[str, ...]) -> np.ndarray:
    """Cityscapes label id -> class index (GTA5 labels, ``*_labelIds.png``)."""
    return _lut({lb.id: lb.name for lb in CS_LABELS if lb.id >= 0}, classes)


@functools.lru_cache(maxsize=8)  # per class list; callers only read it
def train_id_lut(classes: tuple[str, ...]) -> np.ndarray:
    """Cityscapes train id -> class index (``*_labelTrainIds.png``)."""
    return _lut({i: c for i, c in enumerate(CITYSCAPES_CLASSES)}, classes)


@functools.lru_cache(maxsize=8)  # per class list; callers only read it
def synthia_lut(classes: tuple[str, ...]) -> np.ndarray:
    """SYNTHIA class id -> class index."""
    return _lut(SYNTHIA_TO_CITYSCAPES, classes)


# --------------------------------------------------------------------------- samples
@dataclass(frozen=True)
class SemanticSample:
    """One image and its label file, before either is read."""

    sample_id: str
    split: str  # the product's train / val / test
    file: str  # image path relative to data.root
    label: str  # label path relative to data.root
    kind: str  # gta5 | synthia | train_ids | label_ids | polygons
    where: str = field(default="", compare=False)


def in_holdout(key: str) -> bool:
    """Whether file id ``key`` is in the fixed 5 % hold-out (val) of its dataset."""
    return zlib.crc32(key.encode()) % 100 < HOLDOUT_PERCENT


def semantic_samples(
    root: Path, dataset: str, skipped: dict[str, int], on_bad_sample: str = "error"
) -> list[SemanticSample]:
    """Every (image, label) pair of ``<root>/<dataset>`` with its product split.

    A GTA5 / SYNTHIA image without its label (or a label without its image) is counted in
    ``skipped`` as a missing pair whatever ``on_bad_sample`` says (the known incomplete
    distribution); a Cityscapes image without any of its label files is a bad sample: an error
    naming it, or with ``on_bad_sample="skip"`` a counted skip.

    Raises:
        DataError: naming the folder when the dataset's folders are missing or empty.
    """
    folder = Path(root) / dataset
    if dataset == "cityscapes":
        return _cityscapes(Path(root), folder, skipped, on_bad_sample)
    images_dir, labels_dir = (
        ("images", "labels") if dataset == "gta5" else ("RGB", str(Path("GT") / "LABELS"))
    )
    for sub in (images_dir, labels_dir):
        if not (folder / sub).is_dir():
            raise DataError(f"{folder / sub}: no such folder ({dataset} layout: see README)")
    images = {p.stem: p for p in (folder / images_dir).glob("*.png")}
    labels = {p.stem: p for p in (folder / labels_dir).glob("*.png")}
    if not images:
        raise DataError(f"{folder / images_dir}: no PNG images")
    for what, n in (
        ("image without its label", len(images.keys() - labels.keys())),
        ("label without its image", len(labels.keys() - images.keys())),
    ):
        if n:
            skipped[f"missing pair ({what})"] = skipped.get(f"missing pair ({what})", 0) + n
    out = []
    for stem in sorted(images.keys() & labels.keys()):
        out.append(
            SemanticSample(
                sample_id=f"{dataset}-{stem}",
                split="val" if in_holdout(stem) else "train",
                file=str(images[stem].relative_to(root)),
                label=str(labels[stem].relative_to(root)),
                kind=dataset,
                where=f"{folder}: sample {dataset}-{stem}",
            )
        )
    return out


_CS_LABEL_FILES = (
    ("train_ids", "_gtFine_labelTrainIds.png"),
    ("label_ids", "_gtFine_labelIds.png"),
    ("polygons", "_gtFine_polygons.json"),
)


def _cityscapes(root: Path, folder: Path, skipped: dict, on_bad: str) -> list[SemanticSample]:
    out = []
    for cs_split, (product, hold) in {"train": ("train", "val"), "val": ("test", None)}.items():
        img_dir = folder / "leftImg8bit" / cs_split
        if not img_dir.is_dir():
            raise DataError(f"{img_dir}: no such folder (Cityscapes layout: see README)")
        paths = sorted(img_dir.glob("*/*_leftImg8bit.png"))
        if not paths:
            raise DataError(f"{img_dir}: no <city>/*_leftImg8bit.png images")
        for path in paths:
            name = path.name[: -len("_leftImg8bit.png")]
            gt = folder / "gtFine" / cs_split / path.parent.name
            found = next(
                ((k, gt / (name + s)) for k, s in _CS_LABEL_FILES if (gt / (name + s)).is_file()),
                None,
            )
            where = f"{folder}: sample cityscapes-{name}"
            if found is None:
                err = DataError(
                    f"{where}: {gt}: no gtFine label file (labelTrainIds, labelIds or polygons)"
                )
                skip_or_raise(err, skipped, on_bad)
                continue
            kind, label = found
            out.append(
                SemanticSample(
                    sample_id=f"cityscapes-{name}",
                    split=hold if hold and in_holdout(name) else product,
                    file=str(path.relative_to(root)),
                    label=str(label.relative_to(root)),
                    kind=kind,
                    where=where,
                )
            )
    return out


# --------------------------------------------------------------------------- labels
def read_label(sample: SemanticSample, root: Path, classes: tuple[str, ...]) -> np.ndarray:
    """The (H, W) uint8 class-index map of ``sample`` (255 = ignore) at the label's own size.

    Raises:
        DataError: naming the file and sample: missing, unreadable, or not the format its
            dataset writes (a GTA5 label that is not a palette / grey PNG, a SYNTHIA label that
            is not 16-bit).
    """
    path = Path(root) / sample.label
    where = f"{sample.where}: {path}"
    if not path.is_file():
        raise DataError(f"{where}: label file not found")
    try:
        if sample.kind == "synthia":
            return synthia_lut(classes)[_read_png16(path, where)[..., 0]]
        if sample.kind == "polygons":
            return train_id_lut(classes)[_draw_polygons(path, where)]
        with Image.open(path) as img:
            if img.mode not in ("P", "L"):
                raise DataError(
                    f"{where}: expected a palette or grey label PNG, got mode {img.mode}"
                )
            ids = np.asarray(img)
    except DataError:
        raise
    except (OSError, ValueError, KeyError, TypeError, png.Error) as err:
        detail = f"{type(err).__name__}, {err}".replace(": ", ", ")  # the reason is the last clause
        raise DataError(f"{where}: unreadable label ({detail})") from None
    lut = train_id_lut(classes) if sample.kind == "train_ids" else label_id_lut(classes)
    return lut[ids]


def _draw_polygons(path: Path, where: str) -> np.ndarray:
    """The train-id map of a ``*_gtFine_polygons.json``, drawn by cityscapesscripts (which
    exits the process on a label it does not know: those are checked here first)."""
    annotation = Annotation()
    annotation.fromJsonFile(str(path))
    for obj in annotation.objects:
        if obj.deleted:  # cityscapesscripts does not draw these
            continue
        label = obj.label
        if label not in name2label and label.endswith("group"):
            label = label[: -len("group")]
        if label not in name2label:
            raise DataError(f"{where}: unknown Cityscapes label {obj.label!r}")
    return np.asarray(createLabelImage(annotation, "trainIds"))


def _read_png16(path: Path, where: str) -> np.ndarray:
    """A 16-bit PNG as (H, W, C) uint16, every bit kept (pypng)."""
    width, height, rows, info = png.Reader(filename=str(path)).asDirect()
    if info["bitdepth"] != 16:
        raise DataError(f"{where}: expected a 16-bit SYNTHIA label PNG, got {info['bitdepth']}-bit")
    planes = info["planes"]
    data = np.vstack([np.asarray(r, dtype=np.uint16) for r in rows])
    return data.reshape(height, width, planes)
