"""Referring video datasets on disk (``data.dataset: a2d | jhmdb``): A2D Sentences' HDF5 masks
(transposed, one-instance files without the leading axis), its known bad id and missed videos,
J-HMDB's puppet masks, clip paths, bad samples, and one epoch on A2D -> J-HMDB."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from components.config import parse_params
from components.data.schema import DataError, decode_rle
from components.data.video import a2d_samples, clip_paths, jhmdb_samples, video_mask
from tests.conftest import one_epoch, tiny_params
from tests.video_fixtures import video_ids, write_a2d, write_jhmdb


def _read(out, domain, split) -> pd.DataFrame:
    return pd.concat(pd.read_parquet(p) for p in sorted((out / domain / split).glob("*.parquet")))


def test_clip_paths_are_clamped_to_the_video():
    fmt = "v/{:05d}.png"
    assert clip_paths(fmt, 1, 6, 4) == ("v/00001.png", "v/00001.png", "v/00001.png", "v/00002.png")
    assert clip_paths(fmt, 6, 6, 3) == ("v/00005.png", "v/00006.png", "v/00006.png")
    assert clip_paths(fmt, 3, 6, 0) == ()


def test_a2d_samples_and_masks_as_the_release_stores_them(tmp_path):
    expected = write_a2d(tmp_path)
    skipped: dict = {}
    samples = a2d_samples(tmp_path, 8, skipped)
    assert skipped == {"known bad instance id": 1}
    assert {s.sample_id for s in samples} == set(expected)  # the missed video is out
    vids = video_ids(7, "v")
    assert {s.split for s in samples if f"-{vids[0]}-" in s.sample_id} == {"val"}
    assert {s.split for s in samples if f"-{vids[4]}-" in s.sample_id} == {"test"}
    for s in samples:
        np.testing.assert_array_equal(video_mask(s, tmp_path), expected[s.sample_id])
        assert len(s.clip) == 8 and s.file in s.clip
        assert all((tmp_path / p).is_file() for p in s.clip)
    one = [s for s in samples if s.sample_id.endswith("-1-00002")]  # single-instance file
    assert one and video_mask(one[0], tmp_path).any()


def test_jhmdb_evenly_spaced_frames_with_puppet_masks(tmp_path):
    expected = write_jhmdb(tmp_path)
    samples = jhmdb_samples(tmp_path, 4, {})
    assert {s.sample_id for s in samples} == set(expected)
    by_video: dict = {}
    for s in samples:  # a video's frames never straddle splits
        by_video.setdefault(s.sample_id.rsplit("-", 1)[0], set()).add(s.split)
    assert all(len(v) == 1 for v in by_video.values()) and len(by_video) == 8
    for s in samples:
        np.testing.assert_array_equal(video_mask(s, tmp_path), expected[s.sample_id])
        assert s.query.startswith("man ") and len(s.clip) == 4


def test_bad_video_annotations_are_named(tmp_path):
    write_a2d(tmp_path)
    ann = tmp_path / "a2d/text_annotations/a2d_annotation.txt"
    ann.write_text("vid,instance,query\n" + ann.read_text().split("\n", 1)[1])
    with pytest.raises(DataError, match="a2d_annotation.txt: expected the header"):
        a2d_samples(tmp_path, 8, {})
    write_jhmdb(tmp_path)
    lines = (tmp_path / "jhmdb/jhmdb_annotation.txt").read_text() + "ghost_video,nobody\n"
    (tmp_path / "jhmdb/jhmdb_annotation.txt").write_text(lines)
    with pytest.raises(DataError, match=r"line \d+: video ghost_video: 0 frame folders"):
        jhmdb_samples(tmp_path, 8, {})
    skipped: dict = {}
    assert jhmdb_samples(tmp_path, 8, skipped, "skip")
    assert skipped == {"N frame folders": 1}
    raw = tiny_params()
    raw["data"].update({"dataset": "a2d", "root": str(tmp_path), "split_by": "unc"})
    with pytest.raises(ValueError, match="split_by: a2d has no split_by"):
        parse_params(raw)


@pytest.mark.usefixtures("ray_local")
def test_prepare_a2d_to_jhmdb_with_frames_by_path_and_a_skipped_frame(tmp_path):
    from pipelines.prepare import run

    root = tmp_path / "data"
    expected = {**write_a2d(root), **write_jhmdb(root)}
    vid = video_ids(7, "v")[1]
    (root / f"a2d/Release/pngs320H/{vid}/00005.png").unlink()  # 2 samples show this frame
    raw = tiny_params()
    raw["data"].update({"dataset": "a2d", "target_dataset": "jhmdb", "root": str(root),
                        "shard_size": 4, "clip_frames": 4})  # fmt: skip
    params = parse_params(raw)
    with pytest.raises(DataError, match=rf"a2d-{vid}-\d-00005: .*00005.png: image file not found"):
        run(params, tmp_path / "out")
    raw["prepare"] = {"on_bad_sample": "skip"}
    stats = run(parse_params(raw), tmp_path / "out")
    splits = [("source", "train"), ("source", "val"), ("target", "train"), ("target", "val"),
              ("target", "test")]  # fmt: skip
    rows = pd.concat([_read(tmp_path / "out", d, s) for d, s in splits])
    a2d_test = {k for k in expected if any(f"-{v}-" in k for v in video_ids(7, "v")[4:6])}
    lost = {f"a2d-{vid}-1-00005", f"a2d-{vid}-2-00005"}
    assert set(rows["sample_id"]) == set(expected) - lost - a2d_test  # a source's test is unused
    for _, row in rows.iterrows():
        np.testing.assert_array_equal(decode_rle(row["target_rle"]), expected[row["sample_id"]])
        assert row["image_path"] in list(row["clip_paths"]) and len(row["clip_paths"]) == 4
    skipped = sum(
        stats[f"source_{s}"]["skipped"].get("image file not found", 0) for s in ("train", "val")
    )
    assert skipped == 2 and stats["source_train"]["skipped"]["known bad instance id"] == 1
    assert stats["target_test"]["n"] > 0 and stats["source_val"]["n"] > 0


@pytest.mark.usefixtures("ray_local")
def test_a_video_sample_is_encoded_frame_by_frame_and_pooled_over_its_clip(tmp_path):
    """``model.clip_pooling: mean``: a batch carries each sample's ``data.clip_frames`` frames
    read from disk, and the network averages its features over the annotated frame and the
    clip; a clip frame missing on disk is named when the split loads."""
    import torch

    from components.config import ModelConfig
    from components.data.dataset import load_split, network_inputs, to_batch
    from components.data.schema import read_image, resize
    from components.data.vocab import Vocab
    from components.models.network import build_model
    from pipelines.prepare import run

    root = tmp_path / "data"
    write_a2d(root, n_train=6)
    raw = tiny_params()
    raw["data"].update({"dataset": "a2d", "root": str(root), "shard_size": 8, "clip_frames": 3,
                        "image_size": 32})  # fmt: skip
    out = tmp_path / "out"
    run(parse_params(raw), out)
    vocab = Vocab.load(out / "vocab.json")
    args = (out, "source", "train", vocab, 8, 16)
    split = load_split(*args, image_root=root, size=32, clips=True)
    assert load_split(*args, image_root=root, size=32).clips is None  # clip_pooling: none
    batch = to_batch(split, np.arange(2), torch.device("cpu"))
    assert batch["clip"].shape == (2, 3, 3, 32, 32)
    frame = resize(read_image(root / split.clips.paths[1][2]), 32, nearest=False)
    want = (torch.tensor(frame).permute(2, 0, 1).float() / 255 - 0.5) / 0.25
    torch.testing.assert_close(batch["clip"][1, 2], want)
    net = build_model(ModelConfig(**raw["model"]), len(vocab)).eval()
    (image, tokens, lengths, sp), kwargs = network_inputs(batch)
    with torch.no_grad():
        pooled = net(image, tokens, lengths, sp, **kwargs)
        alone = net(image, tokens, lengths, sp)
        # the clip pooling of a clip made of the annotated frame alone changes nothing
        same = net(image, tokens, lengths, sp, clip=image[:, None].expand(-1, 3, -1, -1, -1))
        feats = [net.visual(f)[-net.scales :] for f in (image, *kwargs["clip"].unbind(1))]
    assert not torch.allclose(pooled["response"], alone["response"])
    torch.testing.assert_close(same["response"], alone["response"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(
        pooled["features"], (feats[0][-1] + sum(f[-1] for f in feats[1:])) / 4
    )
    first = root / split.clips.paths[0][0]
    first.unlink()
    with pytest.raises(DataError, match=rf"clip frame .*{first.name} not found"):
        load_split(*args, image_root=root, size=32, clips=True)


@pytest.mark.slow
def test_one_epoch_pipeline_on_a2d_to_jhmdb(tmp_path):
    """The default ``model.clip_pooling: mean``: each batch reads ``data.clip_frames`` frames
    per sample from disk, in the Ray Train worker."""
    root = tmp_path / "data"
    write_a2d(root, n_train=6)
    write_jhmdb(root, n=10)
    raw = tiny_params()
    raw["data"].update({"dataset": "a2d", "target_dataset": "jhmdb", "root": str(root),
                        "shard_size": 8, "image_size": 32})  # fmt: skip
    m = one_epoch(tmp_path, raw)
    assert m["prepare"]["target_test"]["n"] > 0
    assert np.isfinite(m["pretrain"]["val_oiou"]) and 0 <= m["pretrain"]["val_oiou"] <= 1
