"""Tiny GTA5, SYNTHIA-RAND-CITYSCAPES and Cityscapes copies in their exact on-disk formats:

- GTA5: ``images/NNNNN.png`` and palette-mode ``labels/NNNNN.png`` whose indices are Cityscapes
  label ids, with one image whose label is missing (the commonly distributed copy's defect).
- SYNTHIA: ``RGB/NNNNNNN.png`` and 16-bit 3-channel ``GT/LABELS/NNNNNNN.png`` (class id in
  the first channel, an instance id above 255 in the second), as its release writes them.
- Cityscapes: ``leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png`` with, per
  image, one of ``_gtFine_labelTrainIds.png``, ``_gtFine_labelIds.png`` or only
  ``_gtFine_polygons.json`` (the release ships labelIds and polygons; trainIds are generated).

Every scene is a few labelled rectangles over a void background; each writer returns the
expected map of Cityscapes *label ids* per sample id, so a test maps it with its own table.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import png
from PIL import Image, ImageDraw

#: scene rectangles: (Cityscapes label name, x0, y0, x1, y1), inclusive corners
SCENES = [
    [("road", 0, 20, 47, 31), ("car", 4, 12, 17, 23), ("sky", 0, 0, 47, 7)],
    [("road", 0, 22, 47, 31), ("person", 30, 8, 35, 25), ("building", 0, 0, 20, 15)],
    [("sidewalk", 0, 24, 47, 31), ("vegetation", 10, 2, 40, 18), ("pole", 22, 4, 23, 23)],
    [("road", 0, 18, 47, 31), ("bus", 6, 6, 30, 20), ("terrain", 36, 20, 47, 31)],
]
SIZE = (48, 32)  # (width, height)
#: Cityscapes label ids of the names the scenes use (cityscapesscripts' table, checked there)
LABEL_IDS = {
    "road": 7,
    "sidewalk": 8,
    "building": 11,
    "pole": 17,
    "vegetation": 21,
    "terrain": 22,
    "sky": 23,
    "person": 24,
    "car": 26,
    "bus": 28,
}
#: the same classes' SYNTHIA ids (terrain is not one of SYNTHIA's 16: it becomes ignore)
SYNTHIA_IDS = {
    "road": 3,
    "sidewalk": 4,
    "building": 2,
    "pole": 7,
    "vegetation": 6,
    "terrain": 16,
    "sky": 1,
    "person": 10,
    "car": 8,
    "bus": 19,
}


def scene_ids(k: int, ids: dict[str, int] = LABEL_IDS, void: int = 0) -> np.ndarray:
    """(H, W) uint8 map of scene ``k`` in the id table ``ids``."""
    w, h = SIZE
    out = np.full((h, w), void, dtype=np.uint8)
    for name, x0, y0, x1, y1 in SCENES[k % len(SCENES)]:
        out[y0 : y1 + 1, x0 : x1 + 1] = ids[name]
    return out


def ids_with_holdout(n: int, name) -> list[str]:
    """``n`` file ids ``name(i)`` of which exactly one falls in the converter's 5 % hold-out
    (so that a tiny copy still has a val split)."""
    from components.data.cityscapes import in_holdout

    ids = [name(i) for i in range(1, 2 * n + 100)]  # 95 % are not held out: enough
    held = next(x for x in ids if in_holdout(x))
    return sorted([held, *[x for x in ids if not in_holdout(x)][: n - 1]])


def _image(k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed * 1000 + k)
    w, h = SIZE
    return rng.integers(0, 255, (h, w, 3), dtype=np.uint8)


def _palette_png(ids: np.ndarray, path: Path) -> None:
    img = Image.fromarray(ids, mode="P")
    rng = np.random.default_rng(0)  # GTA5's labels carry Cityscapes' colour palette; any will do
    img.putpalette(rng.integers(0, 255, 768, dtype=np.uint8).tolist())
    img.save(path)


def write_gta5(root: Path, n: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    """``root/gta5/{images,labels}/NNNNN.png`` and one extra image without its label."""
    folder = root / "gta5"
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "labels").mkdir(parents=True, exist_ok=True)
    expected = {}
    stems = ids_with_holdout(n + 1, "{:05d}".format)
    for k, stem in enumerate(stems[:n]):
        Image.fromarray(_image(k, seed)).save(folder / "images" / f"{stem}.png")
        ids = scene_ids(k)
        _palette_png(ids, folder / "labels" / f"{stem}.png")
        expected[f"gta5-{stem}"] = ids
    Image.fromarray(_image(n, seed)).save(folder / "images" / f"{stems[n]}.png")  # no label
    return expected


def write_png16(array: np.ndarray, path: Path) -> None:
    """(H, W, 3) uint16 -> a 16-bit RGB PNG (pypng; Pillow cannot write one)."""
    h, w, c = array.shape
    with open(path, "wb") as fh:
        png.Writer(w, h, greyscale=False, bitdepth=16).write(fh, array.reshape(h, w * c).tolist())


def write_synthia(root: Path, n: int = 8, seed: int = 1) -> dict[str, np.ndarray]:
    """``root/synthia/RGB/NNNNNNN.png`` and 16-bit ``GT/LABELS/NNNNNNN.png``; returns the
    expected maps in Cityscapes label ids (terrain included: the converter must drop it)."""
    folder = root / "synthia"
    (folder / "RGB").mkdir(parents=True, exist_ok=True)
    (folder / "GT" / "LABELS").mkdir(parents=True, exist_ok=True)
    expected = {}
    for k, stem in enumerate(ids_with_holdout(n, "{:07d}".format)):
        Image.fromarray(_image(k, seed)).save(folder / "RGB" / f"{stem}.png")
        label = np.zeros((*scene_ids(k).shape, 3), dtype=np.uint16)
        label[..., 0] = scene_ids(k, SYNTHIA_IDS)
        label[..., 1] = np.where(label[..., 0] > 0, 300 + k, 0)  # instance ids above 8 bits
        write_png16(label, folder / "GT" / "LABELS" / f"{stem}.png")
        expected[f"synthia-{stem}"] = scene_ids(k)
    return expected


def polygons_json(k: int) -> dict:
    """Scene ``k`` as a Cityscapes ``*_gtFine_polygons.json``."""
    w, h = SIZE
    objects = [
        {"label": name, "polygon": [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]}
        for name, x0, y0, x1, y1 in SCENES[k % len(SCENES)]
    ]
    return {"imgHeight": h, "imgWidth": w, "objects": objects}


def _polygon_ids(k: int) -> np.ndarray:
    """The label-id map the polygons draw (PIL fills a polygon's boundary, as rectangles)."""
    w, h = SIZE
    img = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(img)
    for obj in polygons_json(k)["objects"]:
        draw.polygon([tuple(p) for p in obj["polygon"]], fill=LABEL_IDS[obj["label"]])
    return np.asarray(img)


def write_cityscapes(root: Path, n_train: int = 12, n_val: int = 4, seed: int = 2) -> dict:
    """``root/cityscapes/{leftImg8bit,gtFine}/{train,val}/<city>/...``; the label of image
    ``k`` is written as trainIds (k % 3 == 0), labelIds (k % 3 == 1) or polygons only."""
    from cityscapesscripts.helpers.labels import id2label

    folder = root / "cityscapes"
    expected = {}
    for split, n, cities in (("train", n_train, ("aachen", "bremen")), ("val", n_val, ("lindau",))):
        names = ids_with_holdout(n, lambda i, c=cities: f"{c[i % len(c)]}_{i:06d}_000019")
        for k, name in enumerate(names):
            city = name.split("_")[0]
            img_dir = folder / "leftImg8bit" / split / city
            gt_dir = folder / "gtFine" / split / city
            img_dir.mkdir(parents=True, exist_ok=True)
            gt_dir.mkdir(parents=True, exist_ok=True)
            Image.fromarray(_image(k, seed + len(split))).save(img_dir / f"{name}_leftImg8bit.png")
            ids = _polygon_ids(k)
            (gt_dir / f"{name}_gtFine_polygons.json").write_text(json.dumps(polygons_json(k)))
            if k % 3 == 0:
                train = np.vectorize(lambda i: id2label[int(i)].trainId % 256)(ids)
                Image.fromarray(train.astype(np.uint8)).save(
                    gt_dir / f"{name}_gtFine_labelTrainIds.png"
                )
            elif k % 3 == 1:
                Image.fromarray(ids).save(gt_dir / f"{name}_gtFine_labelIds.png")
            expected[f"cityscapes-{name}"] = ids
    return expected
