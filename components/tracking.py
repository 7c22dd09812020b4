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


class TrackingUnavailable(RuntimeError):
    """The MLflow tracking server stayed unreachable through MLflow's own retries."""


def _unreachable(exc: BaseException) -> bool:
    """``exc`` (or what caused it) is a failed connection to an MLflow server."""
    import requests

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, requests.exceptions.ConnectionError | requests.exceptions.Timeout):
            return True
        text = str(exc)
        if "API request to" in text and ("Max retries exceeded" in text or "Connection" in text):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _end_run_quietly(status: str) -> None:
    """End the active run with one attempt, no retries: the server may be gone."""
    saved = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    try:
        with contextlib.suppress(Exception):
            mlflow.end_run(status)  # pops the run first, so nothing is retried at exit
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
        else:
            os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = saved


def _unavailable(stage: str, uri: str, exc: BaseException) -> TrackingUnavailable:
    from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_MAX_RETRIES

    cause = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
    return TrackingUnavailable(
        f"{stage}: the MLflow tracking server {uri} is unreachable (still after "
        f"MLFLOW_HTTP_REQUEST_MAX_RETRIES={MLFLOW_HTTP_REQUEST_MAX_RETRIES.get()} retries with "
        f"backoff): {cause}. Outputs the stage already wrote are kept, and so is its training "
        "checkpoint: start the server again (infra/mlflow/server.sh) or point "
        "MLFLOW_TRACKING_URI / runtime.mlflow_tracking_uri at one that runs, then re-run; a "
        "training stage resumes from its checkpoint and its MLflow run is continued."
    )


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

    An MLflow server that restarts is ridden out by MLflow's own retries with backoff
    (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, default 7: about four minutes). One that stays away
    ends the stage with :class:`TrackingUnavailable`, which says what is kept and what to do;
    the run is left unfinished, so the re-run continues it.
    """
    uri = tracking_uri(cfg, root)
    try:
        run = _start(stage, uri, cfg.mlflow_experiment, params, root, name, resume_tag)
    except Exception as exc:
        if _unreachable(exc):
            raise _unavailable(stage, uri, exc) from exc
        raise
    try:
        yield run
    except BaseException as exc:
        if _unreachable(exc):
            _end_run_quietly("FAILED")
            raise _unavailable(stage, uri, exc) from exc
        with contextlib.suppress(Exception):  # the stage's own error is the one to see
            mlflow.end_run("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    try:
        mlflow.end_run("FINISHED")
    except Exception as exc:
        if _unreachable(exc):
            raise _unavailable(stage, uri, exc) from exc
        raise


def _start(stage, uri, experiment, params, root, name, resume_tag) -> mlflow.ActiveRun:
    """The stage's run: the unfinished one of the same invocation, continued, or a new one."""
    mlflow.set_tracking_uri(uri)
    exp_id = _experiment_id(experiment, root)
    flat = flatten(params)
    if resume_tag:
        found = _unfinished_run(exp_id, stage, *resume_tag, "!= 'FINISHED'")
    else:
        resume_tag = ("adaseg.resume_key", resume_key(stage, flat, root))
        found = _unfinished_run(exp_id, stage, *resume_tag, "= 'RUNNING'")
    if found:
        attempts = int(found.data.tags.get("adaseg.attempts", "1")) + 1
        run = mlflow.start_run(run_id=found.info.run_id)
        mlflow.set_tags({"adaseg.pipeline_id": pipeline_id(), "adaseg.attempts": attempts})
        return run
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
    run = mlflow.start_run(experiment_id=exp_id, run_name=name or stage, tags=tags)
    mlflow.log_params(flat)
    return run


def log_history(history: list[dict[str, float]]) -> None:
    """Per-epoch metrics, epoch as the step, in as few requests as MLflow allows (1000 values
    each): a server lost half-way leaves no half-logged epochs to duplicate on the re-run."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    values = [
        Metric(k, float(v), now, int(row["epoch"]))
        for row in history
        for k, v in row.items()
        if k != "epoch"
    ]
    run_id = mlflow.active_run().info.run_id
    client = mlflow.MlflowClient()
    for i in range(0, len(values), 1000):
        client.log_batch(run_id, metrics=values[i : i + 1000])


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


def log_stage(
    phase: str, state: dict, metrics: str, plots: str, out: str, title: str
) -> list[dict]:
    """Shared tail of every training stage, once its model is written to ``out``: the DVC
    metrics and plots first, then MLflow (where it trained, per-epoch metrics, curves, the
    model), and only then the training checkpoint is dropped. So a tracking server lost at the
    end costs no output, and the re-run resumes from the final checkpoint instead of training
    again. Returns the per-epoch history."""
    import tempfile

    from components import train_loop
    from components.io import atomic_path, write_json
    from components.plots import training_curves
    from components.stage_io import write_history

    history = state["history"]
    final = history[-1]
    skip = ("lr", "samples_per_s", "seconds", "val_seconds")  # timings: not DVC metrics
    write_json(metrics, {k: v for k, v in final.items() if k not in skip})
    with atomic_path(plots) as tmp:
        write_history(history, tmp)
    train_loop.tag_run(state)
    log_history(history)
    with tempfile.TemporaryDirectory() as d:
        training_curves(history, Path(d) / "curves.png", title)
        mlflow.log_artifact(str(Path(d) / "curves.png"))
    mlflow.log_artifacts(out, artifact_path="model")
    train_loop.finish(state)
    logging.getLogger("adaseg").info(
        "%s done: %s", phase, {k: round(v, 4) for k, v in final.items()}
    )
    return history
