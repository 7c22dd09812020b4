"""The sample schema shared by every stage (DESIGN.md, "Data contract").

One row = one (image, query, mask) sample. Images and label maps are PNG bytes, or, for a
dataset on disk, the image stays where it is and ``image_path`` names it (relative to
``data.root``); masks are COCO RLE (``{"size": [h, w], "counts": str}``, pycocotools'
compressed string) at the image's own size. Superpixels are computed at ``data.image_size``,
the size every stage trains at; loading brings image and mask to that size. Every converter for
a real dataset writes this schema; everything downstream reads only this schema.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError
from pycocotools import mask as mask_utils

RLE_TYPE = pa.struct([("size", pa.list_(pa.int32())), ("counts", pa.string())])

SAMPLE_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("image_id", pa.string()),
        ("domain", pa.string()),  # "source" | "target"
        ("split", pa.string()),  # "train" | "val" | "test"
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("image_png", pa.binary()),  # empty when the image is read from image_path
        ("image_path", pa.string()),  # null for embedded images
        ("query", pa.string()),
        ("query_type", pa.string()),  # "one" | "many" | "zero"; "none" for a semantic dataset
        ("n_targets", pa.int32()),
        ("target_rle", RLE_TYPE),  # union of the referred objects; empty for "zero"
        ("target_categories", pa.list_(pa.int32())),  # category ids (1..K) of referred objects
        ("semantic_png", pa.binary()),  # uint8 map: 0 background, 1..K categories
        ("instance_rles", pa.list_(RLE_TYPE)),
        ("instance_categories", pa.list_(pa.int32())),
        ("superpixels_png", pa.binary()),  # uint8 SLIC labels, 0..N_r-1
        ("clip_paths", pa.list_(pa.string())),  # a video frame's neighbours (null: an image)
    ]
)

PREDICTION_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("pred_rle", RLE_TYPE),
        ("score", pa.float32()),  # max of the response map
        ("iou", pa.float32()),  # against the ground truth, for convenience
    ]
)


class DataError(ValueError):
    """Bad input data; the message names the file and the sample id."""


def skip_reason(err: DataError) -> str:
    """The kind of a bad-sample error, for the skip counts: its last clause without ids or
    details (``"annotation N is not in instances.json"``)."""
    tail = str(err).rsplit(": ", 1)[-1].split(" (")[0]
    return re.sub(r"\d+", "N", tail)


def skip_or_raise(err: DataError, skipped: dict[str, int], on_bad_sample: str) -> None:
    """``prepare.on_bad_sample``: re-raise ``err`` (``error``), or count it by reason (``skip``)."""
    if on_bad_sample == "error":
        raise err
    reason = skip_reason(err)
    skipped[reason] = skipped.get(reason, 0) + 1


# --------------------------------------------------------------------------- RLE
def encode_rle(mask: np.ndarray) -> dict:
    """Boolean (H, W) mask -> COCO compressed RLE with a str ``counts``."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode_rle(rle: dict) -> np.ndarray:
    """COCO RLE (str or bytes ``counts``) -> boolean (H, W) mask."""
    counts = rle["counts"]
    coco = {
        "size": list(rle["size"]),
        "counts": counts.encode("ascii") if isinstance(counts, str) else counts,
    }
    return mask_utils.decode(coco).astype(bool)


# --------------------------------------------------------------------------- PNG
def encode_png(array: np.ndarray) -> bytes:
    """uint8 (H, W) or (H, W, 3) array -> PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes -> uint8 array. Raises ``UnidentifiedImageError``/``OSError`` on corrupt data."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return np.asarray(img)


# --------------------------------------------------------------------------- shards
def write_shard(table: pa.Table, path: Path) -> None:
    """Write one Parquet shard in the sample schema (the caller handles atomicity)."""
    pq.write_table(table.cast(SAMPLE_SCHEMA), path, compression="zstd")


def shard_paths(root: Path, domain: str, split: str) -> list[Path]:
    """Sorted shards of ``<root>/<domain>/<split>/``; raises naming the folder if none."""
    folder = Path(root) / domain / split
    paths = sorted(folder.glob("*.parquet"))
    if not paths:
        raise DataError(f"{folder}: no Parquet shards found")
    return paths


def read_shards(paths: Iterable[Path], columns: list[str] | None = None) -> pa.Table:
    """Read shards, checking each one has every column the schema requires."""
    wanted = columns or SAMPLE_SCHEMA.names
    tables = []
    for path in paths:
        have = set(pq.read_schema(path).names)
        missing = [c for c in wanted if c not in have]
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(missing)}")
        tables.append(pq.read_table(path, columns=wanted))
    return pa.concat_tables(tables)


def read_image(path: Path) -> np.ndarray:
    """An RGB uint8 image file (any format PIL reads)."""
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def resize(array: np.ndarray, size: int, nearest: bool) -> np.ndarray:
    """(H, W[, 3]) -> (size, size[, 3]); nearest for labels and masks, bilinear for images."""
    if array.shape[:2] == (size, size):
        return array
    mode = Image.NEAREST if nearest else Image.BILINEAR
    was_bool = array.dtype == bool
    out = np.asarray(Image.fromarray(array.astype(np.uint8)).resize((size, size), mode))
    return out.astype(bool) if was_bool else out


def decode_sample(
    row: dict,
    source: str | Path,
    semantic_map: bool = False,
    query: bool = True,
    image_root: str | Path | None = None,
    size: int | None = None,
) -> dict[str, np.ndarray]:
    """Decode one row's image (embedded, or read from ``image_root / image_path``), target mask
    and superpixels (and its semantic map when ``semantic_map``), validating them; with
    ``size``, image, mask and map are brought to ``size`` x ``size`` (the superpixels must be
    at the image's size or at ``size``).

    Raises:
        DataError: naming ``source`` and the sample id for a corrupt or missing image, a mask
            or label map whose size differs from the image, or an empty query.
    """
    sid = row.get("sample_id", "<no sample_id>")
    where = f"{source}: sample {sid}"
    path = Path(image_root or ".") / row["image_path"] if row.get("image_path") else None
    if not row.get("image_png") and path is None:
        raise DataError(f"{where}: neither image_png nor image_path")
    if not row.get("image_png") and not path.is_file():
        raise DataError(f"{where}: image file {path} not found")
    try:
        image = decode_png(row["image_png"]) if row.get("image_png") else read_image(path)
    except (UnidentifiedImageError, OSError, ValueError, TypeError) as err:
        raise DataError(f"{where}: corrupt image ({err})") from None
    if image.ndim != 3 or image.shape[2] != 3:
        raise DataError(f"{where}: image must be RGB, got shape {image.shape}")
    h, w = image.shape[:2]
    if query and (not isinstance(row.get("query"), str) or not row["query"].strip()):
        raise DataError(f"{where}: empty query")
    mask = decode_rle(row["target_rle"])
    if mask.shape != (h, w):
        raise DataError(f"{where}: mask size {mask.shape} differs from image size {(h, w)}")
    sp_size = (size, size) if size and (size, size) != (h, w) else None
    superpixels = _label_map(row, "superpixels", "superpixel", where, *(sp_size or (h, w)))
    out = {"image": image, "mask": mask, "superpixels": superpixels}
    if semantic_map:
        out["semantic"] = _label_map(row, "semantic", "semantic", where, h, w).astype(np.uint8)
    if size:
        out["image"] = resize(image, size, nearest=False)
        out["mask"] = resize(mask, size, nearest=True)
        if semantic_map:
            out["semantic"] = resize(out["semantic"], size, nearest=True)
    return out


def _label_map(row: dict, column: str, what: str, where: str, h: int, w: int) -> np.ndarray:
    """Decode ``row[f"{column}_png"]``, a label map of the image's size (``what`` names it)."""
    if not row.get(f"{column}_png"):
        raise DataError(f"{where}: no {what} map ({column}_png is empty)")
    try:
        label = decode_png(row[f"{column}_png"])
    except (UnidentifiedImageError, OSError, ValueError, TypeError) as err:
        raise DataError(f"{where}: corrupt {what} map ({err})") from None
    if label.shape != (h, w):
        raise DataError(f"{where}: {what} map size {label.shape} differs from image size {(h, w)}")
    return label
