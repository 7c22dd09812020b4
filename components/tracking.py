"""MLflow: one run per stage, grouped per pipeline invocation, tied to git and DVC.

Only the driver process logs (Ray workers report to the driver), so the default SQLite store
never sees concurrent writers. Tags on every run:

* ``adaseg.stage``: the DVC stage; ``adaseg.pipeline_id``: shared by all stages of one
  ``dvc repro`` / ``dvc exp run`` (``ADASEG_PIPELINE_ID`` if set, else derived from the DVC
  process that launched the stage, else fresh);
* ``mlflow.source.git.commit`` and ``adaseg.git_dirty``; ``adaseg.params_hash``: hash of the
  params sections the stage read;
* inside ``dvc exp run``: ``adaseg.dvc_exp`` (the experiment's name) and
  ``adaseg.dvc_exp_baseline``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import subprocess
import uuid
from pathlib import Path
from typing import Any

import mlflow
import psutil

from components.config import RuntimeConfig


def tracking_uri(cfg: RuntimeConfig, root: Path) -> str:
    """``MLFLOW_TRACKING_URI`` > ``runtime.mlflow_tracking_uri`` > local SQLite in ``root``."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.mlflow_tracking_uri
    return uri or f"sqlite:///{(root / 'mlruns.db').resolve()}"


def pipeline_id() -> str:
    """An id shared by every stage of one DVC invocation."""
    if os.environ.get("ADASEG_PIPELINE_ID"):
        return os.environ["ADASEG_PIPELINE_ID"]
    with contextlib.suppress(psutil.Error):
        for proc in psutil.Process().parents():
            cmd = " ".join(proc.cmdline())
            if "dvc" in cmd and (" repro" in cmd or " exp" in cmd):
                return f"dvc-{proc.pid}-{int(proc.create_time())}"
    return uuid.uuid4().hex[:16]


#: a JSON object of tags added to every stage run (set by ``adaseg compare`` for its runs)
TAGS_ENV = "ADASEG_RUN_TAGS"


def extra_tags() -> dict[str, str]:
    raw = os.environ.get(TAGS_ENV)
    return {str(k): str(v) for k, v in json.loads(raw).items()} if raw else {}


def dvc_experiment_tags() -> dict[str, str]:
    """``adaseg.dvc_exp`` (the experiment's name, a row of ``dvc exp show``) and
    ``adaseg.dvc_exp_baseline`` (its baseline commit) when the stage runs inside
    ``dvc exp run``, which sets ``DVC_EXP_NAME`` / ``DVC_EXP_BASELINE_REV`` for its stages."""
    names = {"DVC_EXP_NAME": "adaseg.dvc_exp", "DVC_EXP_BASELINE_REV": "adaseg.dvc_exp_baseline"}
    return {tag: os.environ[var] for var, tag in names.items() if os.environ.get(var)}


def git_state(root: Path) -> tuple[str, bool]:
    def git(*args):
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, check=False
        ).stdout.strip()

    commit = git("rev-parse", "HEAD") or "unknown"
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    return commit, dirty


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, list) else v
    return out


def _experiment_id(name: str, root: Path) -> str:
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    uri = mlflow.get_tracking_uri()
    # A local store keeps artefacts next to it, not in the current working directory.
    location = (root / "mlartifacts").resolve().as_uri() if uri.startswith("sqlite") else None
    try:
        return mlflow.create_experiment(name, artifact_location=location)
    except mlflow.exceptions.MlflowException:  # created concurrently by another stage
        return mlflow.get_experiment_by_name(name).experiment_id


def resume_key(stage: str, flat: dict[str, Any], root: Path) -> str:
    """What makes a stage invocation the same one again: its stage, params, command line
    (inputs and outputs) and repository."""
    import sys

    blob = json.dumps([stage, flat, sys.argv[1:], str(root.resolve())], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _unfinished_run(exp_id: str, stage: str, key: str, value: str, statuses: str):
    found = mlflow.search_runs(
        [exp_id],
        filter_string=f"tags.`adaseg.stage` = '{stage}' and tags.`{key}` = '{value}' "
        f"and attributes.status {statuses}",
        max_results=1,
        order_by=["attributes.start_time DESC"],
        output_format="list",
    )
    return found[0] if found else None


@contextlib.contextmanager
def stage_run(
    stage: str,
    cfg: RuntimeConfig,
    params: dict[str, Any],
    root: Path,
    name=None,
    resume_tag: tuple[str, str] | None = None,
):
    """Start the MLflow run of one stage; yields the active run.

    A stage killed mid-run (``kill -9``, a lost node) leaves its run RUNNING; invoking the
    same stage again (same params and command line, tag ``adaseg.resume_key``) continues that
    run instead of opening a second one: it is re-tagged with this invocation's pipeline id
    and ``adaseg.attempts``, and ends FINISHED or FAILED as any run. A run that ended (even
    FAILED) is never reopened. ``resume_tag=(key, value)``: continue the unfinished run
    carrying that tag, whatever its status (a resumed sweep keeps its parent run).
    """
    mlflow.set_tracking_uri(tracking_uri(cfg, root))
    exp_id = _experiment_id(cfg.mlflow_experiment, root)
    flat = flatten(params)
    if resume_tag:
        found = _unfinished_run(exp_id, stage, *resume_tag, "!= 'FINISHED'")
    else:
        resume_tag = ("adaseg.resume_key", resume_key(stage, flat, root))
        found = _unfinished_run(exp_id, stage, *resume_tag, "= 'RUNNING'")
    if found:
        attempts = int(found.data.tags.get("adaseg.attempts", "1")) + 1
        with mlflow.start_run(run_id=found.info.run_id) as run:
            mlflow.set_tags({"adaseg.pipeline_id": pipeline_id(), "adaseg.attempts": attempts})
            yield run
        return
    commit, dirty = git_state(root)
    tags = {
        "adaseg.stage": stage,
        "adaseg.pipeline_id": pipeline_id(),
        "adaseg.params_hash": hashlib.sha256(
            json.dumps(flat, sort_keys=True, default=str).encode()
        ).hexdigest()[:12],
        "adaseg.git_dirty": str(dirty).lower(),
        "mlflow.source.git.commit": commit,
        resume_tag[0]: resume_tag[1],
        **dvc_experiment_tags(),
        **extra_tags(),
    }
    with mlflow.start_run(experiment_id=exp_id, run_name=name or stage, tags=tags) as run:
        mlflow.log_params(flat)
        yield run


def log_history(history: list[dict[str, float]]) -> None:
    """Per-epoch metrics, epoch as the step."""
    for row in history:
        step = int(row["epoch"])
        mlflow.log_metrics({k: float(v) for k, v in row.items() if k != "epoch"}, step=step)


def upstream_hashes(root: Path, stages=("prepare", "pretrain", "semantics", "init", "masks")):
    """``adaseg.dvc.<stage>``: the md5 DVC recorded for each upstream stage's first output
    (from ``dvc.lock``), so a run can be traced to the exact artefacts it started from."""
    import yaml

    lock = root / "dvc.lock"
    if not lock.is_file():
        return {}
    data = yaml.safe_load(lock.read_text()) or {}
    tags = {}
    for stage in stages:
        outs = (data.get("stages", {}).get(stage) or {}).get("outs") or []
        if outs and outs[0].get("md5"):
            tags[f"adaseg.dvc.{stage}"] = outs[0]["md5"]
    return tags


def log_stage(phase: str, history: list[dict], metrics: str, plots: str, out: str, title: str):
    """Shared tail of every training stage: DVC metrics / plots and MLflow artefacts."""
    import tempfile

    from components.io import atomic_path, write_json
    from components.plots import training_curves
    from components.stage_io import write_history

    log_history(history)
    final = history[-1]
    skip = ("lr", "samples_per_s", "seconds")
    write_json(metrics, {k: v for k, v in final.items() if k not in skip})
    with atomic_path(plots) as tmp:
        write_history(history, tmp)
    with tempfile.TemporaryDirectory() as d:
        training_curves(history, Path(d) / "curves.png", title)
        mlflow.log_artifact(str(Path(d) / "curves.png"))
    mlflow.log_artifacts(out, artifact_path="model")
    logging.getLogger("adaseg").info(
        "%s done: %s", phase, {k: round(v, 4) for k, v in final.items()}
    )
