"""Load prepared Parquet shards into compact arrays and serve torch batches.

A split is held as uint8 / bool arrays (a few MB for the default benchmark), so the driver can
put it in Ray's object store once and every Ray Train worker, local or remote, reads it from there
without a shared file system.

For datasets too large for that (``runtime.data_in_memory: encoded``) a split keeps its samples
as they are stored (PNG bytes or an image path, the mask's RLE, the superpixels' PNG) and
decodes only the rows a batch asks for: :class:`EncodedField` stands where the arrays stood, so
every stage and method indexes it the same way. Host memory is then the encoded size of the
split plus one batch, instead of its decoded size.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import UnidentifiedImageError

from components.data.schema import (
    DataError,
    decode_png,
    decode_rle,
    decode_sample,
    read_image,
    read_shards,
    resize,
    shard_paths,
)
from components.data.vocab import Vocab

LOAD_COLUMNS = [
    "sample_id",
    "image_png",
    "image_path",
    "query",
    "query_type",
    "target_rle",
    "target_categories",
    "superpixels_png",
    "image_id",
    "semantic_png",
]
ENCODED_COLUMNS = [
    "sample_id",
    "image_png",
    "image_path",
    "target_rle",
    "superpixels_png",
    "semantic_png",
]
IGNORE_INDEX = 255


@dataclass(frozen=True)
class EncodedRows:
    """A split's samples as stored: one row per sample of ``table`` (``ENCODED_COLUMNS``) and
    the shard it came from (``shard_of`` into ``shards``), to name in errors. Every row was
    decoded once when the split was loaded, so its fields are known to be valid."""

    table: pa.Table
    shards: list[str]
    shard_of: np.ndarray  # (N,) int32
    nonempty: np.ndarray  # (N,) bool: the (resized) target mask has a pixel
    size: int | None  # fields are brought to size x size (None: as stored)
    hw: tuple[int, int]  # a decoded field's height and width
    num_superpixels: int
    semantic: bool  # the semantic task: the mask is the map's foreground
    image_root: str | None

    def columns(self, field: str) -> list[str]:
        """The stored columns ``field`` decodes from (plus ``sample_id``, to name in errors)."""
        if field == "image":
            return ["sample_id", "image_png", "image_path"]
        if field == "semantic" or (field == "mask" and self.semantic):
            return ["sample_id", "semantic_png"]
        return ["sample_id", "superpixels_png" if field == "superpixels" else "target_rle"]

    def decode(self, field: str, rows: np.ndarray) -> np.ndarray:
        """``field`` (image / mask / superpixels / semantic) of ``rows``, stacked. Only the
        field's own columns are taken from the table: a mask never copies the image bytes."""
        out = []
        picked = self.table.select(self.columns(field))
        taken = picked.take(pa.array(rows, pa.int64())).to_pylist()
        for i, row in zip(rows, taken, strict=True):
            try:
                out.append(self._field(field, row))
            except (UnidentifiedImageError, OSError, ValueError, TypeError) as err:
                where = f"{self.shards[self.shard_of[i]]}: sample {row['sample_id']}"
                raise DataError(f"{where}: cannot decode its {field} ({err})") from None
        return np.stack(out)

    def _field(self, field: str, row: dict) -> np.ndarray:
        if field == "image":
            if row.get("image_png"):
                image = decode_png(row["image_png"])
            else:
                image = read_image(Path(self.image_root or ".") / row["image_path"])
            return resize(image, self.size, nearest=False) if self.size else image
        if field == "superpixels":
            sp = decode_png(row["superpixels_png"]).astype(np.int16)
            return np.minimum(sp, self.num_superpixels - 1)
        if field == "semantic" or (field == "mask" and self.semantic):
            label = decode_png(row["semantic_png"]).astype(np.uint8)
            label = resize(label, self.size, nearest=True) if self.size else label
            return label if field == "semantic" else (label > 0) & (label != IGNORE_INDEX)
        mask = decode_rle(row["target_rle"])
        return resize(mask, self.size, nearest=True) if self.size else mask


@dataclass(frozen=True)
class ClipField:
    """The clip of each sample of a video dataset (``clip_paths``: the annotated frame's
    ``data.clip_frames`` neighbours, itself among them), read from disk when indexed. Always
    decoded per batch: a clip is ``clip_frames`` images."""

    paths: list[tuple[str, ...]]  # per row, relative to image_root
    image_root: str | None
    size: int

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def frames(self) -> int:
        return len(self.paths[0]) if self.paths else 0

    def __getitem__(self, idx) -> np.ndarray:
        """(B, T, size, size, 3) uint8 frames of rows ``idx``."""
        root = Path(self.image_root or ".")
        out = []
        for i in np.asarray(idx).reshape(-1):
            frames = []
            for rel in self.paths[i]:
                try:
                    frames.append(resize(read_image(root / rel), self.size, nearest=False))
                except (UnidentifiedImageError, OSError, ValueError) as err:
                    raise DataError(f"clip frame {root / rel} of row {i}: {err}") from None
            out.append(np.stack(frames))
        return np.stack(out)


class RleMasks:
    """Masks kept as COCO RLE and decoded when indexed (``mask[rows]``), as
    :class:`EncodedField` does: a stage's masks (the ``masks`` stage's semantic masks) for a
    split held encoded."""

    def __init__(self, rles: list[dict]):
        from pycocotools import mask as mask_utils

        self.rles = rles
        coco = [{"size": list(r["size"]), "counts": r["counts"].encode("ascii")} for r in rles]
        self.nonempty = mask_utils.area(coco) > 0 if coco else np.zeros(0, bool)
        self.hw = tuple(rles[0]["size"]) if rles else (0, 0)

    shape = property(lambda self: (len(self.rles), *self.hw))
    dtype = np.dtype(bool)
    ndim = 3

    def __len__(self) -> int:
        return len(self.rles)

    def __getitem__(self, idx) -> np.ndarray:
        if isinstance(idx, (int, np.integer)):
            return decode_rle(self.rles[idx])
        rows = np.arange(len(self))[idx if isinstance(idx, slice) else np.asarray(idx)]
        if len(rows) == 0:
            return np.zeros((0, *self.hw), bool)
        return np.stack([decode_rle(self.rles[i]) for i in rows.reshape(-1)])

    def __iter__(self):
        for rle in self.rles:
            yield decode_rle(rle)


class EncodedField:
    """One field of an :class:`EncodedRows` split, indexed like the decoded array it stands for
    (``field[rows]`` with an int, a slice, an index or a boolean array) and decoded on access.
    ``blank`` fields read as all-zero (a target split whose masks are hidden)."""

    _SHAPE = {"image": (3,), "mask": (), "superpixels": (), "semantic": ()}
    _DTYPE = {"image": np.uint8, "mask": np.bool_, "superpixels": np.int16, "semantic": np.uint8}

    def __init__(self, rows: EncodedRows, field: str, blank: bool = False):
        self.rows, self.field, self.blank = rows, field, blank

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.rows.hw, *self._SHAPE[self.field])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self._DTYPE[self.field])

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return len(self.rows.shard_of)

    def __getitem__(self, idx) -> np.ndarray:
        if isinstance(idx, (int, np.integer)):
            return self[np.asarray([idx])][0]
        if isinstance(idx, slice):
            rows = np.arange(len(self))[idx]
        else:  # numpy's rules: a boolean mask of the right length, or indices (negative too)
            rows = np.arange(len(self))[np.asarray(idx)].reshape(-1)
        if self.blank:
            return np.zeros((len(rows), *self.shape[1:]), self.dtype)
        if len(rows) == 0:
            return np.zeros((0, *self.shape[1:]), self.dtype)
        return self.rows.decode(self.field, rows)

    def __iter__(self):
        for start in range(0, len(self), 64):
            yield from self[start : start + 64]

    def __array__(self, dtype=None, copy=None):
        raise TypeError(
            f"the {self.field} field of an encoded split is decoded by rows (field[rows]); "
            "converting it whole would decode the split into memory"
        )


@dataclass
class SplitArrays:
    """One split in memory. Shapes: N samples, H x W pixels, L words."""

    sample_ids: list[str]
    query_types: list[str]
    queries: list[str]
    images: np.ndarray  # (N, H, W, 3) uint8
    masks: np.ndarray  # (N, H, W) bool
    superpixels: np.ndarray  # (N, H, W) int16, values < num_superpixels
    tokens: np.ndarray  # (N, L) int64, 0 = pad
    lengths: np.ndarray  # (N,) int64
    true_categories: np.ndarray  # (N,) first referred category, 0 if none (diagnostics only)
    labels: np.ndarray | None = None  # (N, H, W) uint8 semantic map, 255 = ignore
    image_ids: list[str] | None = None  # (N,) the image each sample shows (None: its own)
    clips: ClipField | None = None  # video datasets, when the network pools over clips

    @property
    def image_keys(self) -> list[str]:
        """Each sample's image id (its own sample id where the split has none)."""
        return self.image_ids if self.image_ids is not None else self.sample_ids

    def images_index(self) -> tuple[np.ndarray, np.ndarray]:
        """``(first, of)``: the first row of each distinct image, in order of appearance, and
        for every row the position of its image in ``first``."""
        _, first, of = np.unique(
            np.asarray(self.image_keys), return_index=True, return_inverse=True
        )
        order = np.argsort(first)  # images in order of appearance
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        return first[order], rank[of]

    def __len__(self) -> int:
        return len(self.sample_ids)

    @property
    def encoded(self) -> bool:
        """The split keeps its samples encoded and decodes rows on access."""
        return isinstance(self.images, EncodedField)

    def has_mask(self) -> np.ndarray:
        """(N,) bool: the sample's mask has a pixel (False for a one-to-zero query)."""
        if isinstance(self.masks, EncodedField):
            if self.masks.blank:
                return np.zeros(len(self), bool)
            return self.masks.rows.nonempty.copy()
        if isinstance(self.masks, RleMasks):
            return self.masks.nonempty.copy()
        return self.masks.any(axis=tuple(range(1, self.masks.ndim)))

    def without_masks(self) -> SplitArrays:
        """The split with every mask empty and no label maps: a target split as an
        unsupervised method may see it."""
        if isinstance(self.masks, EncodedField):
            blank = EncodedField(self.masks.rows, "mask", blank=True)
            return replace(self, masks=blank, labels=None)
        return replace(self, masks=np.zeros_like(self.masks), labels=None)


def load_split(
    root: str | Path,
    domain: str,
    split: str,
    vocab: Vocab,
    max_words: int,
    num_superpixels: int,
    task: str = "referring",
    num_classes: int | None = None,
    image_root: str | Path | None = None,
    size: int | None = None,
    in_memory: str = "decoded",
    clips: bool = False,
) -> SplitArrays:
    """Read and validate ``<root>/<domain>/<split>/*.parquet``.

    ``task="referring"``: one sample per row (image, query, mask). ``task="semantic"``: one
    sample per image (the first row of each ``image_id``), its semantic map as labels, no
    query; every class id must lie in ``[0, num_classes)`` or be the ignore index 255.
    Superpixel labels beyond ``num_superpixels - 1`` are merged into the last region slot.
    Images kept on disk are read from ``image_root / image_path``; with ``size`` every sample
    is brought to ``size`` x ``size`` (a dataset on disk has images of many sizes).

    ``in_memory="encoded"`` (``runtime.data_in_memory``) decodes every row once to validate
    it, then keeps only its encoded columns: images, masks, superpixels and maps are
    :class:`EncodedField` views decoded per batch. Peak memory: the encoded split plus one
    shard decoded. ``clips``: a video dataset's ``clip_paths`` become a :class:`ClipField`
    (none when the split's rows carry no clip).

    Raises:
        DataError: naming the shard and sample id of any bad row.
    """
    semantic = task == "semantic"
    encoded = in_memory == "encoded"
    images, masks, sps, toks, lens, labels = [], [], [], [], [], []
    ids, image_ids, qtypes, queries, cats = [], [], [], [], []
    tables, shards, shard_of, nonempty, shape, clip_paths = [], [], [], [], None, []
    seen: set[str] = set()
    for path in shard_paths(Path(root), domain, split):
        with_clips = clips and not semantic and "clip_paths" in pq.read_schema(path).names
        table = read_shards([path], LOAD_COLUMNS + ["clip_paths"] * with_clips)
        kept = []
        for pos, row in enumerate(table.to_pylist()):
            if semantic:
                if row["image_id"] in seen:
                    continue
                seen.add(row["image_id"])
            has_map = semantic or bool(row.get("semantic_png"))
            dec = decode_sample(row, path, has_map, not semantic, image_root=image_root, size=size)
            if semantic:
                check_classes(dec["semantic"], num_classes, path, row["sample_id"])
                mask = (dec["semantic"] > 0) & (dec["semantic"] != IGNORE_INDEX)
            else:
                mask = dec["mask"]
            if encoded:  # validated; keep the row as stored, not its arrays
                shape = shape or dec["image"].shape
                if dec["image"].shape != shape or dec["superpixels"].shape != shape[:2]:
                    raise DataError(
                        f"{path}: sample {row['sample_id']}: image / superpixels of size "
                        f"{dec['image'].shape[:2]}, {dec['superpixels'].shape}, not {shape[:2]} "
                        "as the split's first sample"
                    )
                kept.append(pos)
                nonempty.append(bool(mask.any()))
                labels.append(None if not has_map else True)
            else:
                images.append(dec["image"])
                sps.append(np.minimum(dec["superpixels"].astype(np.int16), num_superpixels - 1))
                labels.append(dec.get("semantic"))
                masks.append(mask)
            if semantic:
                toks.append(np.zeros(max_words, dtype=np.int64))
                lens.append(1)
                queries.append("")
            else:
                t, n = vocab.encode(row["query"], max_words)
                toks.append(t)
                lens.append(n)
                queries.append(row["query"])
            if with_clips:
                clip_paths.append(tuple(row["clip_paths"] or ()))
                for rel in clip_paths[-1]:
                    if not (Path(image_root or ".") / rel).is_file():
                        raise DataError(
                            f"{path}: sample {row['sample_id']}: clip frame "
                            f"{Path(image_root or '.') / rel} not found (or model.clip_pooling: "
                            "none reads the annotated frame alone)"
                        )
            ids.append(row["image_id"] if semantic else row["sample_id"])
            image_ids.append(row["image_id"])
            qtypes.append(row["query_type"])
            cats.append((row["target_categories"] or [0])[0])
        if encoded:
            tables.append(table.select(ENCODED_COLUMNS).take(pa.array(kept, pa.int64())))
            shard_of += [len(shards)] * len(kept)
            shards.append(str(path))
    # a referring dataset without semantic maps (e.g. RefCOCO) carries no labels
    has_labels = bool(labels) and all(lb is not None for lb in labels)
    if encoded:
        if shape is None:
            raise DataError(f"{root}/{domain}/{split}: no sample to load")
        rows = EncodedRows(
            table=pa.concat_tables(tables).combine_chunks(),
            shards=shards,
            shard_of=np.asarray(shard_of, dtype=np.int32),
            nonempty=np.asarray(nonempty, dtype=bool),
            size=size,
            hw=tuple(shape[:2]),
            num_superpixels=num_superpixels,
            semantic=semantic,
            image_root=None if image_root is None else str(image_root),
        )
        fields = {f: EncodedField(rows, f) for f in ("image", "mask", "superpixels", "semantic")}
        arrays = {
            "images": fields["image"],
            "masks": fields["mask"],
            "superpixels": fields["superpixels"],
            "labels": fields["semantic"] if has_labels else None,
        }
    else:
        arrays = {
            "images": np.stack(images),
            "masks": np.stack(masks),
            "superpixels": np.stack(sps),
            "labels": np.stack(labels) if has_labels else None,
        }
    clip_field = None
    if clip_paths and len(clip_paths) == len(ids) and all(clip_paths):
        if len({len(c) for c in clip_paths}) != 1:
            raise DataError(f"{root}/{domain}/{split}: clips of different lengths")
        root_s = None if image_root is None else str(image_root)
        clip_size = size or (shape or images[0].shape)[0]  # the frames' size
        clip_field = ClipField(paths=clip_paths, image_root=root_s, size=clip_size)
    return SplitArrays(
        clips=clip_field,
        sample_ids=ids,
        query_types=qtypes,
        queries=queries,
        tokens=np.stack(toks),
        lengths=np.asarray(lens, dtype=np.int64),
        true_categories=np.asarray(cats, dtype=np.int64),
        image_ids=image_ids,
        **arrays,
    )


def check_classes(label: np.ndarray, num_classes: int | None, path, sample_id: str) -> None:
    """Class ids of a semantic map must be in ``[0, num_classes)`` or the ignore index."""
    if num_classes is None:
        raise ValueError("the semantic task needs num_classes")
    bad = (label >= num_classes) & (label != IGNORE_INDEX)
    if bad.any():
        raise DataError(
            f"{path}: sample {sample_id}: class ids {sorted(set(label[bad].tolist()))} outside "
            f"[0, {num_classes}) and not the ignore index {IGNORE_INDEX}"
        )


def to_batch(arr: SplitArrays, idx: np.ndarray, device: torch.device) -> dict[str, torch.Tensor]:
    """Gather rows ``idx`` as model-ready tensors on ``device``."""
    image = torch.from_numpy(arr.images[idx]).to(device).permute(0, 3, 1, 2).contiguous()
    image = image.float() / 255.0
    return {
        "image": (image - 0.5) / 0.25,  # (B, 3, H, W)
        "mask": torch.from_numpy(arr.masks[idx]).to(device).float(),  # (B, H, W)
        "superpixels": torch.from_numpy(arr.superpixels[idx]).to(device).long(),  # (B, H, W)
        "tokens": torch.from_numpy(arr.tokens[idx]).to(device),  # (B, L)
        "lengths": torch.from_numpy(arr.lengths[idx]),  # (B,) stays on CPU for packing
        **(
            {"label": torch.from_numpy(arr.labels[idx]).to(device).long()}  # (B, H, W)
            if arr.labels is not None
            else {}
        ),
        **({"clip": _clip_tensor(arr.clips[idx], device)} if arr.clips is not None else {}),
    }


def _clip_tensor(frames: np.ndarray, device) -> torch.Tensor:
    """(B, T, H, W, 3) uint8 -> (B, T, 3, H, W), normalised as images are."""
    clip = torch.from_numpy(frames).to(device).permute(0, 1, 4, 2, 3).float() / 255.0
    return (clip - 0.5) / 0.25


def network_inputs(batch: dict) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of a referring network's forward for ``batch``: image, tokens,
    lengths, superpixels, and the clip of a video sample when the batch has one."""
    args = (batch["image"], batch["tokens"], batch["lengths"], batch["superpixels"])
    return args, ({"clip": batch["clip"]} if "clip" in batch else {})


def iterate_batches(n: int, batch_size: int, shuffle: bool, rng: np.random.Generator | None = None):
    """Index batches over ``range(n)``; the last partial batch is kept."""
    order = rng.permutation(n) if shuffle else np.arange(n)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]
