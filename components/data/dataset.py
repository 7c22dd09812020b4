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

from components.data.schema import decode_sample, read_shards, shard_paths
from components.data.vocab import Vocab

LOAD_COLUMNS = [
    "sample_id",
    "image_png",
    "query",
    "query_type",
    "target_rle",
    "target_categories",
    "superpixels_png",
]


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

    def __len__(self) -> int:
        return len(self.sample_ids)


def load_split(
    root: str | Path, domain: str, split: str, vocab: Vocab, max_words: int, num_superpixels: int
) -> SplitArrays:
    """Read and validate ``<root>/<domain>/<split>/*.parquet``.

    Superpixel labels beyond ``num_superpixels - 1`` are merged into the last region slot.

    Raises:
        DataError: naming the shard and sample id of any bad row.
    """
    images, masks, sps, toks, lens = [], [], [], [], []
    ids, qtypes, queries, cats = [], [], [], []
    for path in shard_paths(Path(root), domain, split):
        for row in read_shards([path], LOAD_COLUMNS).to_pylist():
            dec = decode_sample(row, path)
            images.append(dec["image"])
            masks.append(dec["mask"])
            sps.append(np.minimum(dec["superpixels"].astype(np.int16), num_superpixels - 1))
            t, n = vocab.encode(row["query"], max_words)
            toks.append(t)
            lens.append(n)
            ids.append(row["sample_id"])
            qtypes.append(row["query_type"])
            queries.append(row["query"])
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
    }


def iterate_batches(n: int, batch_size: int, shuffle: bool, rng: np.random.Generator | None = None):
    """Index batches over ``range(n)``; the last partial batch is kept."""
    order = rng.permutation(n) if shuffle else np.arange(n)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]
