"""Referring video datasets on disk -> referring samples: A2D Sentences and J-HMDB Sentences.

A sample is one annotated frame with its query; the frame is read from disk by path and the
paths of its ``data.clip_frames`` neighbours (the frame among them, clamped to the video) are
stored in ``clip_paths``; with ``model.clip_pooling: mean`` the network encodes every frame of
the clip and averages the features in time (``components.models.network.clip_pooled``).

On-disk layouts (each release's own), under ``<data.root>/<dataset>/``:

- ``a2d``: ``Release/videoset.csv`` (no header: video id, label, start, end, height, width,
  frames, annotated frames, subset 0 = train / 1 = test), ``text_annotations/
  a2d_annotation.txt`` (``video_id,instance_id,query``), ``text_annotations/
  a2d_missed_videos.txt`` (videos to leave out), masks in ``text_annotations/
  a2d_annotation_with_instances/<video>/<frame:05d>.h5`` (``instance``: the frame's instance
  ids; ``reMask``: their masks, stored transposed, without the leading axis when there is one
  instance; frames numbered from 1) and frames ``Release/pngs320H/<video>/<frame:05d>.png``
  (extracted from ``Release/clips320H/<video>.mp4``). The known bad instance id ``1 (copy)``
  is counted and left out.
- ``jhmdb``: ``jhmdb_annotation.txt`` (``video_id,query``), frames ``Rename_Images/<action>/
  <video>/<frame:05d>.png``, masks ``puppet_mask/<action>/<video>/puppet_mask.mat`` (key
  ``part_mask``, H x W x T). Every frame carries a mask; ``JHMDB_FRAMES`` evenly spaced frames of
  each video are its samples (assumed; the public releases do not fix a protocol).

Splits: A2D's train subset minus a fixed 5 % of its videos is train, that 5 % is val, its test
subset is test. J-HMDB Sentences is an evaluation set with no split of its own: as a target, a
fixed half of its videos (by id) is the unlabeled train split, 5 % val and the rest test
(assumed).
"""

from __future__ import annotations

import csv
import glob
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import scipy.io

from components.data.schema import DataError, skip_or_raise

JHMDB_FRAMES = 3
A2D_BAD_INSTANCE = "1 (copy)"


@dataclass(frozen=True)
class VideoSample:
    """One annotated frame and its query, before the frame and mask are read."""

    sample_id: str
    image_id: str  # video and frame: the queries of one frame share it
    split: str
    file: str  # the frame, relative to data.root
    query: str
    mask_file: str  # .h5 (A2D) or .mat (J-HMDB), relative to data.root
    mask_key: int  # A2D: the instance id; J-HMDB: the 0-based frame index
    clip: tuple[str, ...] = ()  # the neighbouring frames' paths, the frame among them
    where: str = field(default="", compare=False)


def _bucket(key: str) -> int:
    return zlib.crc32(key.encode()) % 100


def clip_paths(fmt: str, frame: int, total: int, n: int) -> tuple[str, ...]:
    """``n`` consecutive frame paths around ``frame`` (1-based), clamped to ``[1, total]``."""
    if n <= 0:
        return ()
    first = frame - n // 2
    return tuple(fmt.format(min(max(f, 1), total)) for f in range(first, first + n))


def _csv_rows(path: Path, header: list[str] | None) -> list[list[str]]:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    with open(path, newline="", encoding="utf-8") as fh:
        rows = [[c.strip() for c in r] for r in csv.reader(fh) if r and any(c.strip() for c in r)]
    if header is not None:
        if not rows or [c.lower() for c in rows[0]] != header:
            raise DataError(f"{path}: expected the header {','.join(header)}")
        rows = rows[1:]
    return rows


# --------------------------------------------------------------------------- A2D
def a2d_samples(
    root: Path, clip_frames: int, skipped: dict[str, int], on_bad_sample: str = "error"
) -> list[VideoSample]:
    """Every (query, annotated frame) pair of A2D Sentences whose frame shows the instance.

    Raises:
        DataError: naming the file and line: a missing or malformed annotation file; an
            unreadable mask file unless ``on_bad_sample="skip"`` (then counted).
    """
    folder = Path(root) / "a2d"
    videos = {}
    for i, row in enumerate(_csv_rows(folder / "Release/videoset.csv", None), start=1):
        if len(row) < 9:
            raise DataError(
                f"{folder / 'Release/videoset.csv'}: line {i} has {len(row)} fields, not 9"
            )
        videos[row[0]] = {"frames": int(row[6]), "subset": int(row[8])}
    missed_file = folder / "text_annotations/a2d_missed_videos.txt"
    missed = set(missed_file.read_text().split()) if missed_file.is_file() else set()
    queries: dict[str, list[tuple[str, str]]] = {}
    ann = folder / "text_annotations/a2d_annotation.txt"
    for i, row in enumerate(_csv_rows(ann, ["video_id", "instance_id", "query"]), start=2):
        if len(row) != 3:
            raise DataError(f"{ann}: line {i}: expected video_id,instance_id,query")
        vid, instance, query = row
        if instance == A2D_BAD_INSTANCE:
            skipped["known bad instance id"] = skipped.get("known bad instance id", 0) + 1
            continue
        if vid in missed:
            continue
        if vid not in videos:
            raise DataError(f"{ann}: line {i}: video {vid} is not in Release/videoset.csv")
        if not instance.isdigit():
            raise DataError(f"{ann}: line {i}: instance id {instance!r} is not a number")
        queries.setdefault(vid, []).append((instance, query))
    out = []
    masks_dir = folder / "text_annotations/a2d_annotation_with_instances"
    for vid in sorted(queries):
        info = videos[vid]
        split = "test" if info["subset"] == 1 else ("val" if _bucket(vid) < 5 else "train")
        frame_fmt = f"a2d/Release/pngs320H/{vid}/{{:05d}}.png"
        for h5 in sorted((masks_dir / vid).glob("*.h5")):
            if not h5.stem.isdigit():
                continue  # not a frame's mask file
            frame = int(h5.stem)
            try:
                with h5py.File(h5, "r") as fh:
                    present = [int(v) for v in np.asarray(fh["instance"]).ravel()]
            except (OSError, KeyError, ValueError) as err:
                detail = str(err).replace(": ", ", ")
                bad = DataError(f"{h5}: unreadable A2D mask file ({detail})")
                skip_or_raise(bad, skipped, on_bad_sample)
                continue
            for instance, query in queries[vid]:
                if int(instance) not in present:
                    continue
                sid = f"a2d-{vid}-{instance}-{frame:05d}"
                out.append(
                    VideoSample(
                        sample_id=sid,
                        image_id=f"a2d-{vid}-{frame:05d}",
                        split=split,
                        file=frame_fmt.format(frame),
                        query=query,
                        mask_file=str(h5.relative_to(root)),
                        mask_key=int(instance),
                        clip=clip_paths(frame_fmt, frame, info["frames"], clip_frames),
                        where=f"{ann}: sample {sid}",
                    )
                )
    return out


def a2d_mask(path: Path, instance: int, where: str) -> np.ndarray:
    """(H, W) bool mask of ``instance`` in an A2D ``.h5`` (``reMask`` is stored W x H)."""
    try:
        with h5py.File(path, "r") as fh:
            ids = [int(v) for v in np.asarray(fh["instance"]).ravel()]
            masks = np.asarray(fh["reMask"])
    except (OSError, KeyError) as err:
        raise DataError(f"{where}: {path}: unreadable A2D mask file ({err})") from None
    if masks.ndim == 2:
        masks = masks[None]
    if masks.shape[0] != len(ids) or instance not in ids:
        raise DataError(f"{where}: {path}: no mask of instance {instance} (instances {ids})")
    return masks[ids.index(instance)].T != 0


# --------------------------------------------------------------------------- J-HMDB
def jhmdb_samples(
    root: Path, clip_frames: int, skipped: dict[str, int], on_bad_sample: str = "error"
) -> list[VideoSample]:
    """``JHMDB_FRAMES`` evenly spaced frames of every J-HMDB Sentences video, with its query.

    Raises:
        DataError: naming the file and line: a missing or malformed annotation file; a video
            without frames or mask unless ``on_bad_sample="skip"`` (then counted).
    """
    folder = Path(root) / "jhmdb"
    ann = folder / "jhmdb_annotation.txt"
    out = []
    for i, row in enumerate(_csv_rows(ann, ["video_id", "query"]), start=2):
        if len(row) != 2:
            raise DataError(f"{ann}: line {i}: expected video_id,query")
        vid, query = row
        where = f"{ann}: line {i}: video {vid}"
        frames_dirs = list((folder / "Rename_Images").glob(f"*/{glob.escape(vid)}"))
        if len(frames_dirs) != 1:
            n = len(frames_dirs)
            skip_or_raise(DataError(f"{where}: {n} frame folders (Rename_Images)"), skipped,
                          on_bad_sample)  # fmt: skip
            continue
        action = frames_dirs[0].parent.name
        total = len(list(frames_dirs[0].glob("*.png")))
        mat = folder / "puppet_mask" / action / vid / "puppet_mask.mat"
        if total == 0 or not mat.is_file():
            skip_or_raise(DataError(f"{where}: no frames or no puppet mask file"), skipped,
                          on_bad_sample)  # fmt: skip
            continue
        bucket = _bucket(vid)
        split = "val" if bucket < 5 else ("train" if bucket < 55 else "test")
        frame_fmt = f"jhmdb/Rename_Images/{action}/{vid}/{{:05d}}.png"
        picks = sorted({int(round(x)) for x in np.linspace(1, total, JHMDB_FRAMES + 2)[1:-1]})
        for frame in picks:
            sid = f"jhmdb-{vid}-{frame:05d}"
            out.append(
                VideoSample(
                    sample_id=sid,
                    image_id=sid,
                    split=split,
                    file=frame_fmt.format(frame),
                    query=query,
                    mask_file=str(mat.relative_to(root)),
                    mask_key=frame - 1,
                    clip=clip_paths(frame_fmt, frame, total, clip_frames),
                    where=f"{ann}: sample {sid}",
                )
            )
    return out


def jhmdb_mask(path: Path, index: int, where: str) -> np.ndarray:
    """(H, W) bool puppet mask of frame ``index`` (0-based) from ``puppet_mask.mat``."""
    try:
        part = np.asarray(scipy.io.loadmat(path)["part_mask"])
    except (OSError, KeyError, ValueError) as err:
        raise DataError(f"{where}: {path}: unreadable puppet mask ({err})") from None
    if part.ndim != 3 or not 0 <= index < part.shape[2]:
        raise DataError(f"{where}: {path}: part_mask {part.shape} has no frame {index + 1}")
    return part[:, :, index] != 0


def video_mask(s: VideoSample, root: Path) -> np.ndarray:
    path = Path(root) / s.mask_file
    if path.suffix == ".h5":
        return a2d_mask(path, s.mask_key, s.where)
    return jhmdb_mask(path, s.mask_key, s.where)
