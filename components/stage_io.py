"""Readers and writers of stage outputs that several stages share (so that stage modules never
import each other): the task of a prepared dataset, its splits, CSM labels, semantic-based masks
and training histories."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd

from components.config import Params
from components.data.dataset import RleMasks, SplitArrays, load_split
from components.data.schema import DataError, decode_rle
from components.data.vocab import Vocab
from components.tasks import Task, make_task

CLASSES_FILE = "classes.json"


def load_classes(data_dir: str | Path) -> list[str] | None:
    """The class names of a prepared dataset (``classes.json``, class id = position)."""
    path = Path(data_dir) / CLASSES_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def task_of(params: Params, data_dir: str | Path) -> Task:
    """``params.data.task`` for the dataset in ``data_dir``.

    Raises:
        DataError: the semantic task on a dataset without class names.
    """
    classes = load_classes(data_dir)
    if params.data.task == "semantic" and not classes:
        raise DataError(
            f"{data_dir}: data.task is 'semantic' but the dataset has no {CLASSES_FILE} "
            "(a dataset without semantic maps)"
        )
    return make_task(params.data.task, params.model, classes)


def load_task_split(
    params: Params, data_dir: str | Path, domain: str, split: str, task: Task, vocab: Vocab
) -> SplitArrays:
    """One split as ``task`` reads it (one sample per image for the semantic task)."""
    return _load(params, data_dir, domain, split, vocab, task.name, task.num_classes)


def load_query_split(
    params: Params, data_dir: str | Path, domain: str, split: str, vocab: Vocab
) -> SplitArrays:
    """One split as the referring task reads it (one sample per query), whatever
    ``data.task``: for the SDA stages (semantics, masks) and their pictures."""
    return _load(params, data_dir, domain, split, vocab, "referring", None)


def _load(params, data_dir, domain, split, vocab, task_name, num_classes) -> SplitArrays:
    m, d = params.model, params.data
    return load_split(
        data_dir,
        domain,
        split,
        vocab,
        m.max_words,
        m.num_superpixels,
        task_name,
        num_classes,
        image_root=d.root,
        size=d.image_size if d.on_disk else None,  # on disk: images of many sizes
        in_memory=params.runtime.data_in_memory,
        # video samples' clips, for the network that pools over them
        clips=m.arch == "sda" and m.clip_pooling == "mean",
    )


def _stage_table(folder: str | Path, name: str, stage: str) -> pd.DataFrame:
    """``folder/name`` (a Parquet table the ``stage`` stage writes) indexed by sample id."""
    path = Path(folder) / name
    if not path.is_file():
        raise DataError(f"{path}: missing; it is the {stage} stage's output (run {stage} first)")
    return pd.read_parquet(path).set_index("sample_id")


def load_labels(folder: str | Path, data: SplitArrays) -> tuple[np.ndarray, np.ndarray]:
    """CSM category (N,) and common flag (N,) aligned with ``data`` by sample id."""
    table = _stage_table(folder, "labels.parquet", "semantics")
    missing = [s for s in data.sample_ids if s not in table.index]
    if missing:
        raise DataError(f"{folder}/labels.parquet: no category for sample {missing[0]}")
    rows = table.loc[data.sample_ids]
    return rows["category"].to_numpy(np.int64), rows["common"].to_numpy(bool)


def load_predicted_empty(folder: str | Path, data: SplitArrays) -> np.ndarray:
    """(N,) bool: the stage-1 model finds nothing for the sample's query (``semantics``)."""
    table = _stage_table(folder, "labels.parquet", "semantics")
    if "predicted_empty" not in table.columns:
        raise DataError(f"{folder}/labels.parquet: no predicted_empty column (re-run semantics)")
    return table.loc[data.sample_ids, "predicted_empty"].to_numpy(bool)


def load_masks(folder: str | Path, data: SplitArrays) -> np.ndarray | RleMasks:
    """Semantic-based masks (N, H, W) of the ``masks`` stage aligned with ``data`` by id;
    for a split held encoded, kept as RLE and decoded per batch (:class:`RleMasks`)."""
    table = _stage_table(folder, "semantic_masks.parquet", "masks")
    missing = [s for s in data.sample_ids if s not in table.index]
    if missing:
        raise DataError(f"{folder}/semantic_masks.parquet: no mask for sample {missing[0]}")
    rows = table.loc[data.sample_ids, "mask_rle"]
    if data.encoded:
        return RleMasks([{"size": list(map(int, r["size"])), "counts": r["counts"]} for r in rows])
    return np.stack([decode_rle(r) for r in rows])


def write_history(history: list[dict], path: Path) -> None:
    """Per-epoch rows as CSV (the stages' ``plots/*.csv`` and ``history.csv``)."""
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
