import pytest

from components.io import atomic_path, code_fingerprint, fingerprint, write_json


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


def test_code_fingerprint_changes_with_the_sources_only(tmp_path):
    """Names a training run together with its inputs and params: a stage re-run after a code
    edit must not resume a checkpoint the old code wrote."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "a.py").write_text("x = 1\n")
    (pkg / "sub/b.py").write_text("y = 2\n")
    (pkg / "notes.txt").write_text("not code")
    one = code_fingerprint([pkg])
    assert one == code_fingerprint([pkg])
    (pkg / "notes.txt").write_text("still not code")
    assert code_fingerprint([pkg]) == one
    (pkg / "sub/b.py").write_text("y = 3\n")
    assert code_fingerprint([pkg]) != one
    # the same sources elsewhere (a moved or cloned repository) keep the name
    (pkg / "sub/b.py").write_text("y = 2\n")
    moved = tmp_path / "elsewhere" / "pkg"
    import shutil

    shutil.copytree(pkg, moved)
    assert code_fingerprint([moved]) == one
    assert len(code_fingerprint()) == 12  # the installed packages
