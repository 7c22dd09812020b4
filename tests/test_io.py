import pytest

from components.io import atomic_path, fingerprint, write_json


def test_atomic_dir_replaces_only_on_success(tmp_path):
    target = tmp_path / "out"
    with atomic_path(target, is_dir=True) as tmp:
        (tmp / "a.txt").write_text("first")
    assert (target / "a.txt").read_text() == "first"

    with pytest.raises(RuntimeError), atomic_path(target, is_dir=True) as tmp:
        (tmp / "a.txt").write_text("half-written")
        raise RuntimeError("interrupted")
    assert (target / "a.txt").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp left behind


def test_write_json_and_fingerprint(tmp_path):
    write_json(tmp_path / "m.json", {"b": 1, "a": 2})
    assert (tmp_path / "m.json").read_text().startswith('{\n  "a": 2')
    f = tmp_path / "x.bin"
    f.write_bytes(b"abc")
    one = fingerprint([f], {"k": 1})
    assert one == fingerprint([f], {"k": 1})
    assert one != fingerprint([f], {"k": 2})
    f.write_bytes(b"abd")
    assert one != fingerprint([f], {"k": 1})
