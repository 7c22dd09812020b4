"""Tiny A2D Sentences and J-HMDB Sentences copies in their releases' exact on-disk formats:

- A2D: ``Release/videoset.csv`` (no header, 9 fields), ``text_annotations/a2d_annotation.txt``
  (``video_id,instance_id,query``, with the release's bad id ``1 (copy)``),
  ``a2d_missed_videos.txt``, per annotated frame an HDF5 file as MATLAB v7.3 writes it
  (``instance`` as doubles, ``reMask`` transposed to W x H, no leading axis for a single
  instance; frames numbered from 1), and the frames as ``Release/pngs320H/<vid>/NNNNN.png``.
- J-HMDB: ``jhmdb_annotation.txt`` (``video_id,query``), ``Rename_Images/<action>/<vid>/
  NNNNN.png`` and ``puppet_mask/<action>/<vid>/puppet_mask.mat`` (``part_mask``, H x W x T,
  a MATLAB v5 file as scipy writes it).

Each writer returns the expected (H, W) mask of every sample id.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import scipy.io
from PIL import Image

H, W = 24, 32


def _box(x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    m = np.zeros((H, W), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def _frame(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(path)


def video_ids(n: int, prefix: str) -> list[str]:
    """``n`` video ids, the first of them in the converters' 5 % val bucket."""
    from components.data.video import _bucket

    ids = [f"{prefix}{i:04d}" for i in range(1, 2 * n + 100)]  # 95 % outside the val bucket
    held = next(v for v in ids if _bucket(v) < 5)
    return [held, *[v for v in ids if _bucket(v) >= 5][: n - 1]]


def write_a2d(root: Path, n_train: int = 4, n_test: int = 2, frames: int = 6) -> dict:
    folder = root / "a2d"
    (folder / "Release").mkdir(parents=True, exist_ok=True)
    (folder / "text_annotations").mkdir(parents=True, exist_ok=True)
    vids = video_ids(n_train + n_test + 1, "v")
    missed = vids[-1]
    expected, rows, queries = {}, [], ["video_id,instance_id,query"]
    for k, vid in enumerate(vids):
        subset = 1 if n_train <= k < n_train + n_test else 0
        rows.append(f"{vid},11,0,1,{H},{W},{frames},2,{subset}")
        for f in range(1, frames + 1):
            _frame(folder / f"Release/pngs320H/{vid}/{f:05d}.png", k * 100 + f)
        queries.append(f"{vid},1,the person on the left {k}")
        queries.append(f'{vid},2,"the dog, running"')
        for f in (2, 5):  # annotated frames; instance 2 only in frame 5
            inst = [1, 2] if f == 5 else [1]
            masks = {1: _box(1 + k % 8, 2, 10 + k % 8, 12), 2: _box(15, 10 + f, 28, 20)}
            h5 = folder / f"text_annotations/a2d_annotation_with_instances/{vid}/{f:05d}.h5"
            h5.parent.mkdir(parents=True, exist_ok=True)
            with h5py.File(h5, "w") as fh:
                fh["instance"] = np.asarray([inst], dtype=np.float64)  # MATLAB: a 1 x n double
                stack = np.stack([masks[i].T for i in inst]).astype(np.uint8)  # n x W x H
                fh["reMask"] = stack[0] if len(inst) == 1 else stack
            for i in inst:
                expected[f"a2d-{vid}-{i}-{f:05d}"] = masks[i]
    queries.append(f"{vids[0]},1 (copy),a duplicated query the release carries")
    (folder / "Release/videoset.csv").write_text("\n".join(rows) + "\n")
    (folder / "text_annotations/a2d_annotation.txt").write_text("\n".join(queries) + "\n")
    (folder / "text_annotations/a2d_missed_videos.txt").write_text(f"{missed}\n")
    return {k: v for k, v in expected.items() if f"-{missed}-" not in k}


def write_jhmdb(root: Path, n: int = 8, frames: int = 7) -> dict:
    folder = root / "jhmdb"
    lines, expected = ["video_id,query"], {}
    for k, vid in enumerate(video_ids(n, "clip_")):
        action = ("walk", "wave")[k % 2]
        for f in range(1, frames + 1):
            _frame(folder / f"Rename_Images/{action}/{vid}/{f:05d}.png", 7000 + k * 100 + f)
        part = np.stack([_box(2 + f, 3, 12 + f, 20) for f in range(1, frames + 1)], axis=-1)
        mat = folder / f"puppet_mask/{action}/{vid}/puppet_mask.mat"
        mat.parent.mkdir(parents=True, exist_ok=True)
        scipy.io.savemat(mat, {"part_mask": part.astype(np.uint8)})
        lines.append(f"{vid},man {action}ing on the {k}th street")
        for f in (2, 4, 6):  # 3 evenly spaced of 7
            expected[f"jhmdb-{vid}-{f:05d}"] = part[:, :, f - 1]
    (folder / "jhmdb_annotation.txt").write_text("\n".join(lines) + "\n")
    return expected
