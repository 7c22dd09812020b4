"""The task abstraction: what each task reads, computes and refuses."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from components.adaptation.phase import load_inputs
from components.config import ParamsError, parse_params
from components.data.dataset import load_split
from components.data.schema import DataError, encode_png, write_shard
from components.data.synthetic import CATEGORIES
from components.data.vocab import Vocab
from components.stage_io import task_of
from components.tasks import make_task
from pipelines.prepare import make_rows

CLASSES = ["background", *CATEGORIES]


def _dataset(root, params, rows=6, mutate=None):
    for domain, split in (("source", "train"), ("target", "train"), ("target", "val")):
        table = make_rows(params.data, 0, domain, split, 0, rows)
        if mutate and (domain, split) == ("source", "train"):
            table = mutate(table)
        (root / domain / split).mkdir(parents=True)
        write_shard(table, root / domain / split / "part-00000.parquet")
    Vocab.build(["the red circle"]).save(root / "vocab.json")
    (root / "classes.json").write_text(json.dumps(CLASSES))


def test_semantic_split_is_one_sample_per_image(tmp_path, tiny_raw):
    tiny_raw["data"]["queries_per_image"] = 1  # an image per row, but for the one made below
    params = parse_params(tiny_raw)

    def duplicate_image(table):  # two queries on the same image
        ids = table.column("image_id").to_pylist()
        ids[1] = ids[0]
        return table.set_column(table.schema.get_field_index("image_id"), "image_id", pa.array(ids))

    _dataset(tmp_path, params, mutate=duplicate_image)
    vocab = Vocab.load(tmp_path / "vocab.json")
    ref = load_split(tmp_path, "source", "train", vocab, 8, 48)
    sem = load_split(tmp_path, "source", "train", vocab, 8, 48, "semantic", len(CLASSES))
    assert len(ref) == 6 and len(sem) == 5
    assert sem.labels.max() < len(CLASSES) and (sem.masks == (sem.labels > 0)).all()
    assert sem.queries == [""] * 5


def test_class_ids_outside_the_classes_name_file_and_sample(tmp_path, tiny_raw):
    tiny_raw["data"]["queries_per_image"] = 1  # the bad map is row 2's own image
    params = parse_params(tiny_raw)

    def bad_class(table):
        maps = table.column("semantic_png").to_pylist()
        arr = np.zeros((64, 64), dtype=np.uint8)
        arr[3, 3] = 9  # 9 >= 7 classes, and not the ignore index
        maps[2] = encode_png(arr)
        i = table.schema.get_field_index("semantic_png")
        return table.set_column(i, "semantic_png", pa.array(maps, pa.binary()))

    _dataset(tmp_path, params, mutate=bad_class)
    vocab = Vocab.load(tmp_path / "vocab.json")
    with pytest.raises(DataError, match=r"part-00000.parquet: sample source-train-000002: class"):
        load_split(tmp_path, "source", "train", vocab, 8, 48, "semantic", len(CLASSES))


def test_semantic_task_needs_the_datasets_classes(tmp_path, tiny_raw):
    tiny_raw["data"]["task"] = "semantic"
    _switch_to_dacs(tiny_raw)
    params = parse_params(tiny_raw)
    with pytest.raises(DataError, match="no classes.json"):
        task_of(params, tmp_path)


def test_a_method_without_its_upstream_output_is_refused(tmp_path, tiny_raw):
    params = parse_params(tiny_raw)
    _dataset(tmp_path, params)
    missing = r"sda requires the (masks|semantics) stage's output \(give --"
    with pytest.raises(ParamsError, match=missing):
        load_inputs(params, tmp_path, semantics=None, masks=None)


def test_an_upstream_folder_without_its_table_names_the_file_and_stage(tmp_path, tiny_raw):
    params = parse_params(tiny_raw)
    _dataset(tmp_path, params)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"empty/semantic_masks.parquet: missing; .* masks stage"):
        load_inputs(params, tmp_path, semantics=empty, masks=empty)


def test_target_ground_truth_never_reaches_a_method(tmp_path, tiny_raw):
    _switch_to_dacs(tiny_raw)
    params = parse_params(tiny_raw)
    _dataset(tmp_path, params)
    _, _, (source, target, val), _ = load_inputs(params, tmp_path)
    assert target.labels is None and not target.masks.any()
    assert source.masks.any() and val.masks.any()  # labels stay where they are allowed


@pytest.mark.parametrize(
    ("name", "classes", "message"),
    [
        ("panoptic", None, "unknown task 'panoptic'"),
        ("semantic", ["background"], "2 to 255 classes, got 1"),
        ("semantic", [str(i) for i in range(256)], "2 to 255 classes, got 256"),
    ],
)
def test_impossible_tasks_are_refused(name, classes, message):
    with pytest.raises(ValueError, match=message):
        make_task(name, parse_params_model(), classes)


def test_referring_two_class_view_is_the_sigmoid():
    task = make_task("referring", parse_params_model())
    logit = torch.randn(2, 5, 5)
    probs = task.class_logits({"full_logits": logit}).softmax(1)
    assert torch.allclose(probs[:, 1], torch.sigmoid(logit), atol=1e-6)


def test_semantic_loss_ignores_the_ignore_index():
    task = make_task("semantic", parse_params_model(), CLASSES)
    label = torch.full((1, 4, 4), 255)
    label[0, 0, 0] = 2
    logits = torch.randn(1, 7, 4, 4)
    out = {"full_logits": logits, "logits": [logits]}
    want = torch.nn.functional.cross_entropy(logits[:, :, 0, 0], torch.tensor([2]))
    assert torch.allclose(task.supervised_loss(out, {"label": label}), want)


def parse_params_model():
    from components.config import ModelConfig

    return ModelConfig(widths=[8, 12, 16, 16], hidden=12, embed_dim=12)


def _switch_to_dacs(raw: dict) -> None:
    raw["adapt"] = {**raw["adapt"], "method": "dacs"}
    raw["adapt"].pop("sda")
    raw["tune"].pop("space")  # SDA's sweep space does not apply to DACS
