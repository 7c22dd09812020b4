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
