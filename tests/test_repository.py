"""What the repository itself commits (see infra/dvc/README.md)."""

import subprocess

from tests.conftest import ROOT


def test_no_dvc_lock_is_committed_without_a_remote():
    # a lock describing outputs no remote holds misleads `dvc status` on every fresh clone
    tracked = subprocess.run(
        ["git", "ls-files", "dvc.lock"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    remotes = subprocess.run(
        ["git", "show", "HEAD:.dvc/config"], cwd=ROOT, capture_output=True, text=True
    ).stdout
    if "remote" not in remotes:
        assert not tracked, "dvc.lock is committed but no DVC remote holds its outputs"
