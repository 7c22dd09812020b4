"""Tiny referring datasets in the exact on-disk formats of their public releases, written the
way their tools write them: a REFER ``refs(<split_by>).p`` (a protocol-2 pickle of a list of
dicts), a COCO ``instances.json`` (polygons, one uncompressed crowd RLE, non-contiguous
category ids) and COCO-named JPEG images of several sizes. Ref-ZOM adds ``source: "zero"``
refs and list-valued ``ann_id``.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_DIR = "images/mscoco/images/train2014"
CATEGORIES = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 18, "name": "dog"}]
SIZES = [(48, 40), (56, 44), (40, 40)]  # (width, height)
REFER_SPLITS = {"unc": ["train", "train", "val", "testA", "testB"], "final": ["train", "test"]}


def rect(x0: int, y0: int, x1: int, y1: int) -> list[float]:
    """A rectangle as a COCO polygon (flat x, y list)."""
    return [float(v) for v in (x0, y0, x1, y0, x1, y1, x0, y1)]


def file_name(image_id: int) -> str:
    return f"COCO_train2014_{image_id:012d}.jpg"


def write_refer(
    root: Path, dataset: str = "refcoco", split_by: str = "unc", n_images: int = 10, seed: int = 0
) -> dict:
    """``root/<dataset>/{refs(<split_by>).p, instances.json}`` and the images under
    ``root/IMAGE_DIR``; returns what a test checks against: per sample id its expected
    (rectangles, query_type, split) and the image file of each image id."""
    rng = np.random.default_rng(seed)
    folder = root / dataset
    folder.mkdir(parents=True, exist_ok=True)
    (root / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    images, anns, refs, expected = [], [], [], {}
    splits = REFER_SPLITS[split_by]
    ann_id, ref_id, sent_id = 100, 0, 0
    for i in range(n_images):
        image_id = 9 + 7 * i
        w, h = SIZES[i % len(SIZES)]
        pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        path = root / IMAGE_DIR / file_name(image_id)
        if not path.exists():  # datasets of one root share the images
            Image.fromarray(pixels).save(path, quality=90)
        images.append({"id": image_id, "file_name": file_name(image_id), "height": h, "width": w})
        boxes = []
        for k in range(2):  # two objects per image, each referred to
            x0, y0 = 2 + 18 * k, 3 + 4 * k
            box = (x0, y0, x0 + 14, y0 + 16)
            boxes.append((ann_id, box))
            anns.append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": CATEGORIES[(i + k) % 3]["id"],
                    "segmentation": [rect(*box)],
                    "area": 224.0,
                    "bbox": [box[0], box[1], 14, 16],
                    "iscrowd": 0,
                }
            )
            ann_id += 1
        split = splits[i % len(splits)]
        ref_specs = [([a], [b]) for a, b in boxes]
        if dataset == "refzom":
            ref_specs = [([boxes[0][0], boxes[1][0]], [boxes[0][1], boxes[1][1]])]
            if i % 3 == 0:
                ref_specs.append(([], []))  # one-to-zero
        for ids, rects in ref_specs:
            sentences = []
            for _ in range(2):  # two expressions per object
                text = f"the thing number {sent_id} on the left"
                sentences.append(
                    {"sent_id": sent_id, "sent": text, "raw": text + ".", "tokens": text.split()}
                )
                kind = "zero" if not ids else ("many" if len(ids) > 1 else "one")
                product = {"testA": "test", "testB": "test"}.get(split, split)
                expected[f"{dataset}-{ref_id}-{sent_id}"] = {
                    "rects": rects,
                    "query_type": kind,
                    "split": product,
                    "image_id": image_id,
                }
                sent_id += 1
            ref = {
                "ref_id": ref_id,
                "ann_id": (ids if dataset == "refzom" else ids[0]) if ids else [],
                "image_id": image_id,
                "category_id": CATEGORIES[i % 3]["id"],
                "split": split,
                # the REFER files carry the ann id suffix: not a file on disk
                "file_name": file_name(image_id).replace(".jpg", f"_{ids[0] if ids else 0}.jpg"),
                "sent_ids": [s["sent_id"] for s in sentences],
                "sentences": sentences,
            }
            if dataset == "refzom":
                ref["source"] = "zero" if not ids else "refcoco"
            refs.append(ref)
            ref_id += 1
    # one crowd annotation with an uncompressed RLE (as COCO stores crowds), unreferenced
    w, h = SIZES[0]
    anns.append(
        {
            "id": ann_id,  # the next free id (a fixed one collides in large fixtures)
            "image_id": images[0]["id"],
            "category_id": 1,
            "segmentation": {"size": [h, w], "counts": [h * 2, h * 3, h * (w - 5)]},
            "area": float(3 * h),
            "bbox": [2, 0, 3, h],
            "iscrowd": 1,
        }
    )
    coco = {"images": images, "annotations": anns, "categories": CATEGORIES}
    (folder / "instances.json").write_text(json.dumps(coco))
    with open(folder / f"refs({split_by}).p", "wb") as fh:
        pickle.dump(refs, fh, protocol=2)
    return {"samples": expected, "refs": refs}


def rect_mask(h: int, w: int, rects: list) -> np.ndarray:
    out = np.zeros((h, w), dtype=bool)
    for x0, y0, x1, y1 in rects:
        out[y0:y1, x0:x1] = True
    return out


class _Boom:
    """Unpickling runs ``os.system`` through ``__reduce__``: what a refused pickle must not do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def write_malicious_refs(path: Path, marker: Path) -> None:
    with open(path, "wb") as fh:
        pickle.dump([{"ref_id": 0, "payload": _Boom(marker)}], fh, protocol=2)
