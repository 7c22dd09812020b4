"""Atomic outputs: a stage's output appears complete or not at all (DVC does not do this)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path


@contextlib.contextmanager
def atomic_path(target: str | Path, is_dir: bool = False):
    """Yield a temporary sibling of ``target``; move it into place only if the block succeeds.

    The temporary path sits in the same folder (same file system), so the final ``os.replace``
    is atomic; on any exception it is removed and ``target`` is left untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    _remove(tmp)
    if is_dir:
        tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
    os.replace(tmp, target)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_json(path: str | Path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def code_fingerprint(roots: list[Path] | None = None) -> str:
    """Short hash of the Python sources under ``roots`` (default: the ``components`` and
    ``pipelines`` packages): part of a training run's name, so that an interrupted stage
    re-run after a code change starts afresh instead of resuming a checkpoint that other code
    wrote."""
    if roots is None:
        import pipelines

        roots = [Path(__file__).parent, Path(pipelines.__file__).parent]
    h = hashlib.sha256()
    for root in map(Path, roots):
        for p in sorted(root.rglob("*.py")):
            h.update(f"{root.name}/{p.relative_to(root).as_posix()}".encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:12]


def fingerprint(paths: list[Path], extra: dict | None = None) -> str:
    """Short content hash of files (sorted) plus a JSON-able ``extra``; names a training run."""
    h = hashlib.sha256(json.dumps(extra or {}, sort_keys=True).encode())
    for p in sorted(Path(p) for p in paths):
        h.update(p.name.encode())
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:12]
