"""Semantic datasets on disk (``data.dataset: gta5 | synthia | cityscapes``): label tables from
cityscapesscripts, SYNTHIA's 16-bit labels, Cityscapes' three label sources, GTA5's missing
pairs, bad samples (error or skip), the Ray conversion, and one epoch on SYNTHIA -> Cityscapes
with the 13-class mIoU* in the evaluation."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from components.config import parse_params
from components.data.cityscapes import (
    CITYSCAPES_CLASSES,
    MIOU13_CLASSES,
    SYNTHIA_CLASSES,
    label_id_lut,
    read_label,
    semantic_samples,
)
from components.data.schema import DataError, decode_png
from tests.cityscapes_fixtures import (
    LABEL_IDS,
    write_cityscapes,
    write_gta5,
    write_synthia,
)
from tests.conftest import one_epoch, tiny_params


def _params(root, dataset="gta5", **data):
    raw = tiny_params()
    raw["data"].update(
        {
            "task": "semantic",
            "dataset": dataset,
            "target_dataset": "cityscapes",
            "root": str(root),
            "shard_size": 4,
            **data,
        }
    )
    return parse_params(_semantic(raw))


def _semantic(raw: dict) -> dict:
    """The tiny params for the semantic task: SDA is referring-only, so DACS and no SDA sweep."""
    raw["adapt"] = {**{k: v for k, v in raw["adapt"].items() if k != "sda"}, "method": "dacs"}
    raw["tune"].pop("space", None)
    return raw


def _read(out, domain, split) -> pd.DataFrame:
    return pd.concat(pd.read_parquet(p) for p in sorted((out / domain / split).glob("*.parquet")))


def test_class_tables_are_cityscapesscripts_own():
    from cityscapesscripts.helpers.labels import name2label

    assert len(CITYSCAPES_CLASSES) == 19 and len(SYNTHIA_CLASSES) == 16
    assert len(MIOU13_CLASSES) == 13 and not {"wall", "fence", "pole"} & set(MIOU13_CLASSES)
    lut = label_id_lut(CITYSCAPES_CLASSES)
    for name, label_id in LABEL_IDS.items():  # the fixture's ids are the package's
        assert name2label[name].id == label_id
        assert lut[label_id] == name2label[name].trainId
    assert lut[0] == lut[1] == 255  # unlabeled, ego vehicle: ignored
    assert label_id_lut(SYNTHIA_CLASSES)[LABEL_IDS["terrain"]] == 255  # not one of the 16


def test_synthia_labels_keep_their_16_bits(tmp_path):
    expected = write_synthia(tmp_path, n=4)
    samples = semantic_samples(tmp_path, "synthia", {})
    assert [s.sample_id for s in samples] == sorted(expected)
    s = samples[0]
    with Image.open(tmp_path / s.label) as img:  # the reader the format defeats
        assert not np.asarray(img)[..., 0].any()
    got = read_label(s, tmp_path, SYNTHIA_CLASSES)
    want = label_id_lut(SYNTHIA_CLASSES)[expected[s.sample_id]]
    np.testing.assert_array_equal(got, want)
    assert (got != 255).any() and SYNTHIA_CLASSES[got[0, 0]] == "sky"


def test_gta5_missing_pairs_are_counted_not_fatal(tmp_path):
    expected = write_gta5(tmp_path, n=6)
    skipped: dict = {}
    samples = semantic_samples(tmp_path, "gta5", skipped, on_bad_sample="error")
    assert skipped == {"missing pair (image without its label)": 1}
    assert {s.sample_id for s in samples} == set(expected)
    for s in samples:
        got = read_label(s, tmp_path, CITYSCAPES_CLASSES)
        np.testing.assert_array_equal(got, label_id_lut(CITYSCAPES_CLASSES)[expected[s.sample_id]])


def test_cityscapes_train_ids_label_ids_and_polygons_give_one_map(tmp_path):
    expected = write_cityscapes(tmp_path, n_train=6, n_val=3)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    samples = semantic_samples(tmp_path, "cityscapes", {})
    assert {s.kind for s in samples} == {"train_ids", "label_ids", "polygons"}
    assert {s.split for s in samples if "lindau" in s.sample_id} == {"test"}  # official val
    for s in samples:
        got = read_label(s, tmp_path, CITYSCAPES_CLASSES)
        want = label_id_lut(CITYSCAPES_CLASSES)[expected[s.sample_id]]
        np.testing.assert_array_equal(got, want, err_msg=f"{s.sample_id} from {s.kind}")
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # read only


def test_bad_labels_are_named_or_skipped(tmp_path):
    write_gta5(tmp_path, n=3)
    rgb = tmp_path / "gta5/labels/00002.png"
    Image.open(rgb).convert("RGB").save(rgb)
    s = semantic_samples(tmp_path, "gta5", {})[1]
    with pytest.raises(DataError, match=r"gta5-00002: .*00002.png: expected a palette or grey"):
        read_label(s, tmp_path, CITYSCAPES_CLASSES)
    write_cityscapes(tmp_path, n_train=3, n_val=1)
    bad = next(x for x in semantic_samples(tmp_path, "cityscapes", {}) if x.kind == "polygons")
    gt = tmp_path / bad.label
    gt.write_text(json.dumps({"imgHeight": 32, "imgWidth": 48, "objects": [
        {"label": "hovercraft", "polygon": [[0, 0], [4, 0], [4, 4]]}]}))  # fmt: skip
    with pytest.raises(DataError, match="unknown Cityscapes label 'hovercraft'"):
        read_label(bad, tmp_path, CITYSCAPES_CLASSES)
    gt.unlink()
    with pytest.raises(DataError, match=rf"{bad.sample_id}: .*no gtFine label"):
        semantic_samples(tmp_path, "cityscapes", {})
    skipped: dict = {}
    assert len(semantic_samples(tmp_path, "cityscapes", skipped, "skip")) == 3
    assert sum(skipped.values()) == 1
    with pytest.raises(DataError, match="synthia/RGB: no such folder"):
        semantic_samples(tmp_path, "synthia", {})


def test_params_name_the_field_of_a_semantic_pair(tmp_path):
    raw = tiny_params()
    raw["data"].update({"dataset": "gta5", "root": str(tmp_path), "target_dataset": "cityscapes"})
    with pytest.raises(ValueError, match="task: gta5 is a semantic dataset"):
        parse_params(raw)
    raw["data"]["task"] = "semantic"
    raw["data"]["target_dataset"] = "synthia"
    with pytest.raises(ValueError, match="target_dataset: synthia ships no test split"):
        parse_params(raw)
    raw["data"]["target_dataset"] = "refcoco"
    with pytest.raises(ValueError, match="target_dataset: refcoco is a referring dataset"):
        parse_params(raw)


@pytest.mark.usefixtures("ray_local")
def test_prepare_converts_gta5_to_cityscapes_with_a_summary(tmp_path):
    from pipelines.prepare import run

    root = tmp_path / "data"
    expected = {**write_gta5(root, n=10), **write_cityscapes(root, n_train=8, n_val=3)}
    bad = sorted(k for k in expected if k.startswith("gta5-"))[3]
    (root / f"gta5/labels/{bad[5:]}.png").write_bytes(b"not a png")  # a bad sample, skipped
    raw = _params(root).model_dump(mode="json")
    raw["prepare"] = {"on_bad_sample": "skip"}
    out = tmp_path / "prepared"
    stats = run(parse_params(raw), out)
    assert json.loads((out / "classes.json").read_text()) == list(CITYSCAPES_CLASSES)
    lut = label_id_lut(CITYSCAPES_CLASSES)
    rows = pd.concat([_read(out, d, s) for d, s in [("source", "train"), ("source", "val"),
                      ("target", "train"), ("target", "val"), ("target", "test")]])  # fmt: skip
    assert len(rows) == 10 + 11 - 1 and bad not in set(rows["sample_id"])
    for _, row in rows.iterrows():
        label = decode_png(row["semantic_png"])
        np.testing.assert_array_equal(label, lut[expected[row["sample_id"]]])
        assert row["image_png"] == b"" and (root / row["image_path"]).is_file()
        assert row["query_type"] == "none" and (row["height"], row["width"]) == label.shape
    src = stats["source_train"]
    assert src["skipped"]["missing pair (image without its label)"] == 1
    unreadable = [
        stats[f"source_{s}"]["skipped"].get("unreadable label", 0) for s in ("train", "val")
    ]
    assert sum(unreadable) == 1
    shares = src["class_pixel_share"]
    assert set(shares) <= set(CITYSCAPES_CLASSES) and abs(sum(shares.values()) - 1) < 1e-9
    assert shares["road"] > shares["car"] > 0 and 0 < src["ignored_pixel_share"] < 1
    assert stats["target_test"]["n"] == 3


@pytest.mark.slow
def test_one_epoch_pipeline_on_synthia_to_cityscapes(tmp_path):
    """``adaseg prepare``, ``pretrain``, ``evaluate`` on SYNTHIA -> Cityscapes as a user runs
    them: the 16 shared classes, terrain ignored, mIoU and mIoU* in ``eval.json`` (the splits
    held encoded: images and label maps decoded per batch)."""
    root = tmp_path / "data"
    write_synthia(root, n=12)
    write_cityscapes(root, n_train=12, n_val=4)
    raw = tiny_params()
    raw["data"].update(
        {"task": "semantic", "dataset": "synthia", "target_dataset": "cityscapes",
         "root": str(root), "shard_size": 8, "image_size": 32}
    )  # fmt: skip
    raw["runtime"]["data_in_memory"] = "encoded"  # label maps decoded per batch, and evaluated
    m = one_epoch(tmp_path, _semantic(raw), evaluate=True)
    assert json.loads((tmp_path / "prep/classes.json").read_text()) == list(SYNTHIA_CLASSES)
    ev = m["evaluate"]["model"]["target_test"]
    assert 0 <= ev["miou13"] <= 1 and 0 <= ev["miou"] <= 1
    assert "iou/terrain" not in ev  # not one of SYNTHIA's 16 classes
