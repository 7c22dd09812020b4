"""Sample schema: RLE / PNG round trips, Parquet round trip, and clear errors on bad data."""

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from components.config import DataConfig
from components.data.dataset import load_split
from components.data.schema import (
    SAMPLE_SCHEMA,
    DataError,
    decode_png,
    decode_rle,
    encode_png,
    encode_rle,
    read_shards,
    write_shard,
)
from components.data.vocab import Vocab
from pipelines.prepare import make_rows


def test_rle_round_trip():
    rng = np.random.default_rng(0)
    for shape in [(1, 1), (5, 7), (64, 64)]:
        mask = rng.random(shape) > 0.6
        rle = encode_rle(mask)
        assert rle["size"] == list(shape) and isinstance(rle["counts"], str)
        assert np.array_equal(decode_rle(rle), mask)
    assert not decode_rle(encode_rle(np.zeros((4, 4), bool))).any()


def test_png_round_trip():
    img = np.random.default_rng(1).integers(0, 255, (8, 9, 3), dtype=np.uint8)
    assert np.array_equal(decode_png(encode_png(img)), img)


@pytest.fixture
def shard(tmp_path):
    table = make_rows(DataConfig(), 0, "source", "train", 0, 6)
    folder = tmp_path / "source" / "train"
    folder.mkdir(parents=True)
    write_shard(table, folder / "part-00000.parquet")
    return tmp_path, folder / "part-00000.parquet"


def test_parquet_round_trip_with_pandas(shard):
    root, path = shard
    df = pd.read_parquet(path)
    assert list(df.columns) == SAMPLE_SCHEMA.names
    assert df["sample_id"].tolist() == [f"source-train-{i:06d}" for i in range(6)]
    row = df.iloc[0]
    mask = decode_rle({"size": list(row.target_rle["size"]), "counts": row.target_rle["counts"]})
    assert mask.shape == (row.height, row.width)
    sp = decode_png(row.superpixels_png)
    assert sp.shape == mask.shape and sp.max() < 255
    vocab = Vocab.build(df["query"])
    arrays = load_split(root, "source", "train", vocab, 12, 48)
    assert arrays.images.shape == (6, 64, 64, 3) and arrays.masks.dtype == bool


def _corrupt(path, column, value, row=2):
    table = pq.read_table(path)
    col = table.column(column).to_pylist()
    col[row] = value
    table = table.set_column(table.schema.get_field_index(column), column, [col])
    pq.write_table(table, path)
    return table.column("sample_id")[row].as_py()


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("image_png", b"not a png", "corrupt image"),
        ("query", "   ", "empty query"),
        ("target_rle", encode_rle(np.ones((10, 10), bool)), "mask size (10, 10) differs"),
    ],
)
def test_bad_samples_name_file_and_sample(shard, column, value, message):
    root, path = shard
    sid = _corrupt(path, column, value)
    with pytest.raises(DataError) as info:
        load_split(root, "source", "train", Vocab(["the"]), 12, 48)
    assert str(path) in str(info.value) and sid in str(info.value) and message in str(info.value)


def test_missing_column_names_the_file(shard):
    _, path = shard
    pq.write_table(pq.read_table(path).drop_columns(["query"]), path)
    with pytest.raises(DataError, match=r"part-00000.parquet: missing column\(s\) query"):
        read_shards([path])


def test_vocab_round_trip(tmp_path):
    vocab = Vocab.build(["The red circle", "all the green shapes"])
    vocab.save(tmp_path / "v.json")
    again = Vocab.load(tmp_path / "v.json")
    assert again.itos == vocab.itos and again.itos[:2] == ["<pad>", "<unk>"]
    ids, n = again.encode("the purple circle", 5)
    assert n == 3 and ids[1] == 1 and ids[3:].tolist() == [0, 0]  # unknown word -> <unk>


def test_a_split_held_encoded_reads_as_the_decoded_one(tmp_path):
    """``runtime.data_in_memory: encoded``: every field indexes as the decoded arrays do (an
    index, a negative one, a slice with a step, a boolean mask), and a stage's masks loaded
    for it stay RLE (``stage_io.load_masks``) yet read the same."""
    from components.data.dataset import RleMasks
    from components.stage_io import load_masks

    folder = tmp_path / "source" / "train"
    folder.mkdir(parents=True)
    cfg = DataConfig(queries_per_image=2)
    table = make_rows(cfg, 0, "source", "train", 0, 12)
    write_shard(table, folder / "part-00000.parquet")
    vocab = Vocab.build(table.column("query").to_pylist())
    args = (tmp_path, "source", "train", vocab, 8, 48)
    dec, enc = load_split(*args), load_split(*args, in_memory="encoded")
    pick = np.zeros(len(dec), bool)
    pick[[1, 4, 5]] = True
    for name in ("images", "masks", "superpixels", "labels"):
        a, b = getattr(dec, name), getattr(enc, name)
        assert b.shape == a.shape and b.dtype == a.dtype, name
        for idx in (3, -1, slice(1, 9, 3), pick, np.array([5, 0, 5])):
            np.testing.assert_array_equal(b[idx], a[idx], err_msg=f"{name}[{idx}]")
    np.testing.assert_array_equal(enc.has_mask(), dec.has_mask())
    assert len(dec.images_index()[0]) == 6  # two queries per image
    masks = dec.masks[::-1].copy()  # any masks aligned with the split, as the stage writes them
    stage = tmp_path / "masks"
    stage.mkdir()
    pd.DataFrame(
        {"sample_id": dec.sample_ids, "mask_rle": [encode_rle(m) for m in masks]}
    ).to_parquet(stage / "semantic_masks.parquet", index=False)
    loaded = load_masks(stage, enc)
    assert isinstance(loaded, RleMasks) and isinstance(load_masks(stage, dec), np.ndarray)
    np.testing.assert_array_equal(loaded[np.arange(len(dec))], masks)
    np.testing.assert_array_equal(loaded[pick], masks[pick])
    hidden = enc.without_masks()
    assert not hidden.has_mask().any() and hidden.labels is None
    with pytest.raises(DataError, match="no sample to load"):
        (tmp_path / "source" / "val").mkdir()
        write_shard(table.slice(0, 0), tmp_path / "source" / "val" / "part-00000.parquet")
        load_split(tmp_path, "source", "val", vocab, 8, 48, in_memory="encoded")
