"""Shared fixtures: tiny params derived from the real params.yaml, and a shared local Ray."""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

#: The real params.yaml shrunk to seconds of CPU work (STYLE.md #9b).
TINY_OVERRIDES = {
    "data": {
        "splits": {
            "source_train": 64,
            "source_val": 16,
            "target_train": 64,
            "target_val": 16,
            "target_test": 24,
        },
        "shard_size": 40,
        # one image per query: 64 images per train split, enough for the tiny models to learn
        # something in seconds (at 4 per image all of them predict nothing and the comparison
        # has no gap to close); the grouping of v4 is tested in test_synthetic / test_sda
        "queries_per_image": 1,
    },
    "model": {"widths": [8, 16, 16, 24], "hidden": 16, "embed_dim": 16},
    "pretrain": {"epochs": 2, "batch_size": 16, "warmup_steps": 2},
    "oracle": {"epochs": 1, "batch_size": 16, "warmup_steps": 2},
    "init": {"epochs": 1, "batch_size": 16, "warmup_steps": 2},
    "masks": {"epochs": 1, "batch_size": 16, "warmup_steps": 2},
    "adapt": {"epochs": 2, "batch_size": 8, "warmup_steps": 2, "sda": {"pixels": 64}},
    "evaluate": {"overlay_samples": 4},
    "runtime": {"object_store_memory_mb": 100},
    # 2 methods x 2 tasks x 1 seed: every kind of unit of the comparison, in minutes (DACS: a
    # mean teacher; CDANet: the cross-domain attention and discriminators)
    "compare": {"methods": ["dacs", "cdanet"], "seeds": [0]},
}


#: A 4-trial grid (half of it re-clusters: tau 0.5 != 0.2), 2 epochs, 4 trials at a time.
TINY_TUNE = {
    "search": "grid",
    "num_samples": 1,
    "epochs": 2,
    "grace_period": 1,
    "cpus_per_trial": 0.5,
    "space": {
        "semantics": {"tau": {"values": [0.2, 0.5]}},
        "adapt": {"sda": {"gamma_max": {"values": [0.8, 0.9]}}},
    },
}


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def real_params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def tiny_params() -> dict:
    raw = _merge(real_params(), TINY_OVERRIDES)
    raw["tune"] = {**raw["tune"], **TINY_TUNE}  # the whole space is replaced, not merged
    return raw


@pytest.fixture
def tiny_raw() -> dict:
    return tiny_params()


@pytest.fixture(scope="session")
def ray_local():
    """One small local Ray instance for the in-process tests."""
    import ray

    from components.runtime import use_loopback

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    use_loopback()  # as the product's own local instance: 127.0.0.1 only
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20)
    yield
    ray.shutdown()


def repo_env(repo: Path) -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    for var in (
        "MLFLOW_TRACKING_URI",
        "MLFLOW_RUN_ID",
        "RAY_ADDRESS",
        "ADASEG_PIPELINE_ID",
        "ADASEG_TUNE_INJECT_FAILURE",
    ):
        env.pop(var, None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_in(repo: Path, *cmd: str, check=True, timeout=900) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        cmd, cwd=repo, env=repo_env(repo), capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return proc


def one_epoch(repo: Path, raw: dict, evaluate: bool = False) -> dict:
    """``adaseg prepare`` then one epoch of ``pretrain`` (and ``evaluate``) in ``repo`` with the
    params ``raw``, as a user runs them; returns each stage's metrics by stage name."""
    raw["pretrain"]["epochs"] = 1
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    cli = ["python", "-m", "pipelines.cli"]
    run_in(repo, *cli, "prepare", "--out", "prep", "--metrics", "m/prepare.json")
    run_in(repo, *cli, "pretrain", "--data", "prep", "--out", "model",
           "--metrics", "m/pretrain.json", "--plots", "p.csv")  # fmt: skip
    if evaluate:
        run_in(repo, *cli, "evaluate", "--data", "prep", "--models", "model", "--metrics",
               "m/evaluate.json", "--predictions", "pred", "--overlays", "ov")  # fmt: skip
    return {p.stem: json.loads(p.read_text()) for p in (repo / "m").glob("*.json")}


@pytest.fixture(scope="session")
def repo(tmp_path_factory) -> Path:
    """A git + DVC repo with this project's files and tiny params, after one `dvc repro`."""
    return make_tiny_repo(tmp_path_factory.mktemp("repo"))


def make_tiny_repo(dst: Path) -> Path:
    """This project's files in ``dst`` (an empty folder) with tiny params, as a git repo
    after one ``dvc repro`` (its log: :func:`repro_log`)."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for rel in files:
        src = ROOT / rel
        if src.is_file() and not rel.startswith(("data/", "models/", "metrics/", "plots/")):
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    for lock in ("dvc.lock",):
        (dst / lock).unlink(missing_ok=True)
    (dst / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    for cmd in (
        ["git", "init", "-q"],
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A"],
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"],
    ):
        subprocess.run(cmd, cwd=dst, check=True)
    proc = run_in(dst, "dvc", "repro")
    repro_log(dst).write_text(proc.stdout + proc.stderr)
    return dst


def mlflow_runs(repo: Path):
    """Every run of a test repository's MLflow store (its ``mlruns.db``), as a DataFrame."""
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlruns.db'}")
    return mlflow.search_runs(experiment_names=["adaseg"])


def sweep_children(repo: Path, sweep_id: str):
    """The child runs (one per trial) of the sweep named ``<sweep_id>-<hash>``."""
    runs = mlflow_runs(repo)
    # sweep ids are "<tune.name>-<hash of inputs and params>"
    ids = runs["tags.adaseg.sweep_id"].fillna("")
    parents = runs[(runs["tags.adaseg.stage"] == "tune") & ids.str.startswith(f"{sweep_id}-")]
    assert len(parents) == 1, "one parent run per sweep"
    return runs[runs["tags.mlflow.parentRunId"] == parents["run_id"].iloc[0]]


def tune_cmd(name: str, out: str, *extra: str) -> list[str]:
    """``adaseg tune`` on the test repository's upstream outputs, writing under ``out``."""
    return [
        "adaseg",
        "-S",
        f"tune.name={name}",
        *extra,
        "tune",
        "--data",
        "data/prepared",
        "--base",
        "models/source_only",
        "--init",
        "models/init",
        "--semantics",
        "semantics",
        "--masks",
        "masks",
        "--out",
        f"{out}/tune",
        "--plots",
        f"{out}/plots",
        "--metrics",
        f"{out}/tune.json",
    ]


def dvc_metrics(repo: Path) -> dict:
    """``dvc metrics show`` of the repository: {metrics file: its values}."""
    import json

    shown = json.loads(run_in(repo, "dvc", "metrics", "show", "--json").stdout)[""]["data"]
    return {path: v["data"] for path, v in shown.items() if "data" in v}


def repro_log(repo: Path) -> Path:
    """What the ``repo`` fixture's ``dvc repro`` printed (kept outside the repository)."""
    return repo.with_name(repo.name + ".repro.log")


def start_killable(repo: Path, cmd: list[str]) -> subprocess.Popen:
    """Start ``cmd`` in its own process group, so :func:`kill_group` also takes its Ray."""
    return subprocess.Popen(
        cmd,
        cwd=repo,
        env=repo_env(repo),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process and everything it started (a crash, as the OS would do it)."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
