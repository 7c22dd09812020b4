"""Referring datasets on disk (``data.dataset``): the REFER family and Ref-ZOM converted from
fixtures in their exact formats, the safe refs unpickler, bad samples (error or skip), the
resumable Ray conversion and a one-epoch pipeline on a RefCOCO -> RefCOCO+ pair."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pandas as pd
import pytest

from components.config import parse_params
from components.data.refer import annotation_rle, load_refs, refer_samples
from components.data.schema import DataError, decode_rle
from tests.conftest import one_epoch, tiny_params
from tests.refer_fixtures import (
    IMAGE_DIR,
    file_name,
    rect,
    rect_mask,
    write_malicious_refs,
    write_refer,
)


def _params(root, **data):
    raw = tiny_params()
    raw["data"].update({"dataset": "refcoco", "root": str(root), "shard_size": 8, **data})
    return parse_params(raw)


def _read(out, domain, split) -> pd.DataFrame:
    return pd.concat(pd.read_parquet(p) for p in sorted((out / domain / split).glob("*.parquet")))


def _iou(a, b) -> float:
    return (a & b).sum() / max(1, (a | b).sum())


# ------------------------------------------------------------------------- the refs pickle
def test_a_pickle_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "refs(unc).p"
    write_malicious_refs(path, marker)
    with pytest.raises(DataError, match=r"refs\(unc\)\.p: refused to unpickle posix\.system"):
        load_refs(path)
    assert not marker.exists()
    # the fixture is real: plain pickle runs it
    assert pickle.loads(path.read_bytes()) == [{"ref_id": 0, "payload": 0}]
    assert marker.exists()


def test_builtin_containers_load_and_a_missing_file_is_named(tmp_path):
    path = tmp_path / "refs(unc).p"
    refs = [{"ref_id": 1, "ann_id": 2, "image_id": 3, "split": "val", "sentences": [], "t": {4}}]
    path.write_bytes(pickle.dumps(refs, protocol=2))
    assert load_refs(path) == refs
    with pytest.raises(DataError, match="refs file not found"):
        load_refs(tmp_path / "nothing.p")
    path.write_bytes(pickle.dumps([{"ref_id": 1}], protocol=2))
    with pytest.raises(DataError, match="ref #0 lacks ann_id, image_id, split, sentences"):
        load_refs(path)


# ------------------------------------------------------------------------- annotations
def test_polygon_and_rle_masks_and_bad_polygons_are_named():
    rle = annotation_rle([rect(2, 3, 10, 9)], 12, 16, "f: ann 1")
    assert _iou(decode_rle(rle), rect_mask(12, 16, [(2, 3, 10, 9)])) > 0.7
    crowd = {"size": [4, 5], "counts": [4, 8, 8]}  # column-major runs: 0 x4, 1 x8, 0 x8
    mask = decode_rle(annotation_rle(crowd, 4, 5, "f: ann 2"))
    assert mask[:, 1:3].all() and mask.sum() == 8
    for seg, message in [
        ([[1.0, 2.0, 3.0]], "malformed polygon"),
        ([[1, 2, 3, 4]], "malformed polygon"),
        ([rect(2, 3, 40, 9)], r"polygon outside its 16x12 image"),
        ([[1.0, float("nan"), 3, 4, 5, 6]], "polygon has a non-finite coordinate"),
        ({"size": [5, 5], "counts": [25]}, r"RLE size \[5, 5\] is not the image's \[12, 16\]"),
        ("nonsense", "segmentation is neither polygons nor RLE"),
    ]:
        with pytest.raises(DataError, match=f"f: ann 3: {message}"):
            annotation_rle(seg, 12, 16, "f: ann 3")


def test_refcoco_every_sentence_is_a_sample_with_the_instances_file_name(tmp_path):
    expected = write_refer(tmp_path, "refcoco", "unc")["samples"]
    skipped = {}
    samples, inst = refer_samples(tmp_path, "refcoco", None, IMAGE_DIR, skipped)
    assert {s.sample_id for s in samples} == set(expected) and not skipped
    assert inst.categories == {1: 1, 3: 2, 18: 3}  # contiguous, in id order
    by_image = {}
    for s in samples:
        want = expected[s.sample_id]
        assert s.split == want["split"] and s.query_type == want["query_type"] == "one"
        assert s.file == f"{IMAGE_DIR}/{file_name(want['image_id'])}"  # no _<ann_id> suffix
        by_image.setdefault(s.image_id, set()).add(s.sample_id)
    assert {len(v) for v in by_image.values()} == {4}  # 2 objects x 2 expressions each
    assert {s.split for s in samples} == {"train", "val", "test"}  # testA + testB -> test


def test_refzom_zero_and_many_targets_and_a_held_out_val(tmp_path):
    expected = write_refer(tmp_path, "refzom", "final", n_images=40)["samples"]
    samples, _ = refer_samples(tmp_path, "refzom", None, IMAGE_DIR, {})
    kinds = {s.sample_id: s.query_type for s in samples}
    assert kinds == {k: v["query_type"] for k, v in expected.items()}
    assert set(kinds.values()) == {"zero", "many"}
    zero = [s for s in samples if s.query_type == "zero"]
    assert all(not s.segmentations and not s.categories for s in zero)
    splits = {s.split for s in samples}
    assert splits == {"train", "val", "test"}  # val: a fixed 5 % of the train images
    val_images = {s.image_id for s in samples if s.split == "val"}
    train_images = {s.image_id for s in samples if s.split == "train"}
    assert val_images and not val_images & train_images


def test_a_bad_ref_is_an_error_naming_it_or_a_counted_skip(tmp_path):
    refs = write_refer(tmp_path, "refcoco", "unc")["refs"]
    refs[1]["ann_id"] = 424242
    with open(tmp_path / "refcoco" / "refs(unc).p", "wb") as fh:
        pickle.dump(refs, fh, protocol=2)
    with pytest.raises(DataError, match=r"refs\(unc\)\.p: ref 1: annotation 424242 is not in"):
        refer_samples(tmp_path, "refcoco", None, IMAGE_DIR, {})
    skipped = {}
    samples, _ = refer_samples(tmp_path, "refcoco", None, IMAGE_DIR, skipped, "skip")
    assert skipped == {"annotation N is not in instances.json": 2}
    assert not [s for s in samples if s.sample_id.startswith("refcoco-1-")]


def test_params_name_the_field_of_a_dataset_on_disk(tmp_path):
    raw = tiny_params()
    raw["data"]["dataset"] = "refcoco"
    with pytest.raises(ValueError, match="root: data.dataset refcoco needs the folder"):
        parse_params(raw)
    raw["data"].update({"root": str(tmp_path), "target_dataset": "refcocog"})
    raw["data"]["target_split_by"] = "unc"
    with pytest.raises(ValueError, match="target_split_by: refcocog has no split_by 'unc'"):
        parse_params(raw)


# ------------------------------------------------------------------------- prepare on Ray
@pytest.mark.usefixtures("ray_local")
def test_prepare_converts_resumably_with_images_by_path(tmp_path):
    from pipelines.prepare import run

    root = tmp_path / "data"
    expected = write_refer(root, "refcoco", "unc")["samples"]
    write_refer(root, "refcoco+", "unc", seed=1)
    params = _params(root, target_dataset="refcoco+")
    lost = root / IMAGE_DIR / file_name(9 + 7 * 9)  # the last image: only the last shards
    lost.rename(lost.with_suffix(".bak"))
    out = tmp_path / "prepared"
    with pytest.raises(
        DataError, match=rf"ref \d+, sentence \d+: .*{lost.name}: image file not found"
    ):
        run(params, out)
    partial = tmp_path / ".prepared.partial"
    done_before = {p: p.stat().st_mtime_ns for p in partial.glob("*/*/*.parquet")}
    assert done_before and not out.exists()  # nothing half-written in place
    lost.with_suffix(".bak").rename(lost)
    stats = run(params, out)
    assert not partial.exists()
    for p, mtime in done_before.items():  # converted shards were kept, not redone
        assert (out / p.relative_to(partial)).stat().st_mtime_ns == mtime
    train = _read(out, "source", "train")
    assert train["image_png"].map(len).eq(0).all() and train["image_path"].notna().all()
    for _, row in train.iterrows():
        want = expected[row["sample_id"]]
        mask = decode_rle(row["target_rle"])
        assert mask.shape == (row["height"], row["width"])
        assert _iou(mask, rect_mask(*mask.shape, want["rects"])) > 0.7
    s = stats["source_train"]
    assert s["n"] == len(train) and s["query_types"] == {"zero": 0, "one": len(train), "many": 0}
    assert s["expressions_per_image"] == {"mean": 4.0, "max": 4}
    assert sum(s["mask_area_histogram"].values()) == len(train)
    assert json.loads((out / "classes.json").read_text()) == ["background", "person", "car", "dog"]
    assert {"source_val", "target_train", "target_val", "target_test"} <= set(stats)


@pytest.mark.usefixtures("ray_local")
def test_prepare_skips_a_missing_image_and_counts_it(tmp_path):
    from pipelines.prepare import run

    root = tmp_path / "data"
    write_refer(root, "refcoco", "unc")
    (root / IMAGE_DIR / file_name(9)).unlink()  # image 0: train, 4 samples
    raw_params = _params(root).model_dump(mode="json")
    raw_params["prepare"] = {"on_bad_sample": "skip"}
    stats = run(parse_params(raw_params), tmp_path / "out")
    assert stats["source_train"]["skipped"] == {"image file not found": 4}
    assert stats["target_train"]["skipped"] == {"image file not found": 4}
    assert stats["source_val"]["skipped"] == {}


@pytest.mark.usefixtures("ray_local")
def test_a_split_held_encoded_decodes_the_same_batches_from_disk(tmp_path):
    """``runtime.data_in_memory: encoded``: the split keeps image paths, RLEs and superpixel
    PNGs, not pixels, and decodes a batch's rows from disk to what the decoded split holds;
    an image that goes missing after loading is an error naming the shard and sample."""
    import pickle as std_pickle

    import torch

    from components.data.dataset import load_split, to_batch
    from components.data.vocab import Vocab
    from pipelines.prepare import run

    root = tmp_path / "data"
    write_refer(root, "refcoco", "unc", n_images=8)
    out, params = tmp_path / "prepared", _params(root)
    run(params, out)
    vocab = Vocab.load(out / "vocab.json")
    args = (out, "source", "train", vocab, 8, 16)
    kw = {"image_root": root, "size": params.data.image_size}
    decoded = load_split(*args, **kw)
    encoded = load_split(*args, **kw, in_memory="encoded")
    assert encoded.encoded and not decoded.encoded
    assert len(std_pickle.dumps(encoded)) < len(std_pickle.dumps(decoded)) / 4
    assert encoded.images.shape == decoded.images.shape
    assert (encoded.has_mask() == decoded.has_mask()).all()
    rows = np.random.default_rng(0).permutation(len(decoded))[:5]
    for key, value in to_batch(decoded, rows, torch.device("cpu")).items():
        assert torch.equal(to_batch(encoded, rows, torch.device("cpu"))[key], value), key
    with pytest.raises(TypeError, match="decoded by rows"):
        np.asarray(encoded.images)
    hidden = encoded.without_masks()
    assert not hidden.has_mask().any() and not hidden.masks[rows].any()
    first = root / IMAGE_DIR / file_name(9)  # image 0, the split's first rows
    first.unlink()
    with pytest.raises(DataError, match=r"part-\d+\.parquet: sample \S+: cannot decode its image"):
        encoded.images[:1]


# ------------------------------------------------------------------------- one epoch
@pytest.mark.slow
def test_one_epoch_pipeline_on_a_refcoco_to_refcoco_plus_pair(tmp_path):
    """``adaseg prepare`` then ``adaseg pretrain`` on the fixture pair, as a
    user runs them: images read from disk at data.image_size (per batch, the splits held
    encoded), metrics written."""
    root = tmp_path / "data"
    write_refer(root, "refcoco", "unc", n_images=12)
    write_refer(root, "refcoco+", "unc", n_images=12, seed=1)
    raw = tiny_params()
    raw["data"].update(
        {"dataset": "refcoco", "target_dataset": "refcoco+", "root": str(root), "shard_size": 16}
    )
    raw["data"]["image_size"] = 32
    raw["runtime"]["data_in_memory"] = "encoded"  # the decoded path runs everywhere else
    m = one_epoch(tmp_path, raw)
    assert m["prepare"]["source_train"]["images"] == 6
    assert m["prepare"]["source_train"]["skipped"] == 0
    assert np.isfinite(m["pretrain"]["val_oiou"]) and 0 <= m["pretrain"]["val_oiou"] <= 1
