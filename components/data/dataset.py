"""Load prepared Parquet shards into compact arrays and serve torch batches.

A split is held as uint8 / bool arrays (a few MB for the default benchmark), so the driver can
put it in Ray's object store once and every Ray Train worker, local or remote, reads it from there
without a shared file system.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from components.data.schema import DataError, decode_sample, read_shards, shard_paths
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
IGNORE_INDEX = 255


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
) -> SplitArrays:
    """Read and validate ``<root>/<domain>/<split>/*.parquet``.

    ``task="referring"``: one sample per row (image, query, mask). ``task="semantic"``: one
    sample per image (the first row of each ``image_id``), its semantic map as labels, no
    query; every class id must lie in ``[0, num_classes)`` or be the ignore index 255.
    Superpixel labels beyond ``num_superpixels - 1`` are merged into the last region slot.
    Images kept on disk are read from ``image_root / image_path``; with ``size`` every sample
    is brought to ``size`` x ``size`` (a dataset on disk has images of many sizes).

    Raises:
        DataError: naming the shard and sample id of any bad row.
    """
    semantic = task == "semantic"
    images, masks, sps, toks, lens, labels = [], [], [], [], [], []
    ids, image_ids, qtypes, queries, cats = [], [], [], [], []
    seen: set[str] = set()
    for path in shard_paths(Path(root), domain, split):
        for row in read_shards([path], LOAD_COLUMNS).to_pylist():
            if semantic:
                if row["image_id"] in seen:
                    continue
                seen.add(row["image_id"])
            has_map = semantic or bool(row.get("semantic_png"))
            dec = decode_sample(row, path, has_map, not semantic, image_root=image_root, size=size)
            images.append(dec["image"])
            sps.append(np.minimum(dec["superpixels"].astype(np.int16), num_superpixels - 1))
            labels.append(dec.get("semantic"))
            if semantic:
                check_classes(dec["semantic"], num_classes, path, row["sample_id"])
                masks.append((dec["semantic"] > 0) & (dec["semantic"] != IGNORE_INDEX))
                toks.append(np.zeros(max_words, dtype=np.int64))
                lens.append(1)
                queries.append("")
            else:
                masks.append(dec["mask"])
                t, n = vocab.encode(row["query"], max_words)
                toks.append(t)
                lens.append(n)
                queries.append(row["query"])
            ids.append(row["image_id"] if semantic else row["sample_id"])
            image_ids.append(row["image_id"])
            qtypes.append(row["query_type"])
            cats.append((row["target_categories"] or [0])[0])
    return SplitArrays(
        sample_ids=ids,
        query_types=qtypes,
        queries=queries,
        images=np.stack(images),
        masks=np.stack(masks),
        superpixels=np.stack(sps),
        tokens=np.stack(toks),
        lengths=np.asarray(lens, dtype=np.int64),
        true_categories=np.asarray(cats, dtype=np.int64),
        # a referring dataset without semantic maps (e.g. RefCOCO) carries no labels
        labels=None if any(lb is None for lb in labels) else np.stack(labels),
        image_ids=image_ids,
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
    }


def iterate_batches(n: int, batch_size: int, shuffle: bool, rng: np.random.Generator | None = None):
    """Index batches over ``range(n)``; the last partial batch is kept."""
    order = rng.permutation(n) if shuffle else np.arange(n)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]
