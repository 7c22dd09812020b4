"""MLflow stage runs against a real SQLite store: a killed stage's run is continued by the
next invocation of the same stage, never doubled; a run that ended is never reopened."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import mlflow
import pytest

from components.config import RuntimeConfig
from components.tracking import stage_run
from tests.conftest import ROOT


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.setenv("ADASEG_PIPELINE_ID", "first")
    monkeypatch.setattr(sys, "argv", ["adaseg", "pretrain", "--out", "models/x"])
    return RuntimeConfig(mlflow_tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}")


def _runs(cfg):
    mlflow.set_tracking_uri(cfg.mlflow_tracking_uri)
    return mlflow.search_runs(experiment_names=[cfg.mlflow_experiment])


KILLED_STAGE = """
import json, os, signal, sys
from pathlib import Path
import mlflow
from components.config import RuntimeConfig
from components.tracking import stage_run
uri, root, params = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
sys.argv = ["adaseg", "pretrain", "--out", "models/x"]
with stage_run("pretrain", RuntimeConfig(mlflow_tracking_uri=uri), params, root) as run:
    mlflow.log_metric("loss", 1.0, step=1)
    print(run.info.run_id, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # as kill -9 would: the run is never ended
"""


def _killed_run(cfg, tmp_path, params):
    """A stage run whose process was killed mid-stage (SIGKILL, in a child process)."""
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_STAGE, cfg.mlflow_tracking_uri, str(tmp_path),
         json.dumps(params)],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    run_id = proc.stdout.split()[0]
    mlflow.set_tracking_uri(cfg.mlflow_tracking_uri)
    assert mlflow.get_run(run_id).info.status == "RUNNING"
    return run_id


def test_rerun_continues_the_killed_run(store, tmp_path, monkeypatch):
    params = {"pretrain": {"epochs": 4}}
    killed = _killed_run(store, tmp_path, params)
    monkeypatch.setenv("ADASEG_PIPELINE_ID", "second")
    with stage_run("pretrain", store, params, tmp_path) as run:
        assert run.info.run_id == killed
        mlflow.log_metric("loss", 0.5, step=2)
    runs = _runs(store)
    assert runs["run_id"].tolist() == [killed]
    assert runs["status"].tolist() == ["FINISHED"]
    assert runs["tags.adaseg.attempts"].tolist() == ["2"]
    assert runs["tags.adaseg.pipeline_id"].tolist() == ["second"]
    steps = [m.step for m in mlflow.MlflowClient().get_metric_history(killed, "loss")]
    assert steps == [1, 2]


def test_other_params_or_outputs_start_a_new_run(store, tmp_path, monkeypatch):
    killed = _killed_run(store, tmp_path, {"pretrain": {"epochs": 4}})
    with stage_run("pretrain", store, {"pretrain": {"epochs": 5}}, tmp_path) as run:
        assert run.info.run_id != killed
    monkeypatch.setattr(sys, "argv", ["adaseg", "pretrain", "--out", "models/y"])
    with stage_run("pretrain", store, {"pretrain": {"epochs": 4}}, tmp_path) as run:
        assert run.info.run_id != killed
    assert len(_runs(store)) == 3


def test_a_failed_run_is_never_reopened(store, tmp_path):
    params = {"pretrain": {"epochs": 4}}
    with pytest.raises(RuntimeError), stage_run("pretrain", store, params, tmp_path) as run:
        failed = run.info.run_id
        raise RuntimeError("bad data")
    assert mlflow.get_run(failed).info.status == "FAILED"
    with stage_run("pretrain", store, params, tmp_path) as run:
        assert run.info.run_id != failed


def test_a_dvc_experiments_runs_carry_its_name(store, tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", "no-mi")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "abc123")
    with stage_run("adapt", store, {"adapt": {"lr": 1e-4}}, tmp_path):
        pass
    monkeypatch.delenv("DVC_EXP_NAME")
    monkeypatch.delenv("DVC_EXP_BASELINE_REV")
    with stage_run("adapt", store, {"adapt": {"lr": 3e-4}}, tmp_path):
        pass
    runs = _runs(store).set_index("params.adapt.lr")
    assert runs.loc["0.0001", "tags.adaseg.dvc_exp"] == "no-mi"
    assert runs.loc["0.0001", "tags.adaseg.dvc_exp_baseline"] == "abc123"
    assert not isinstance(runs.loc["0.0003", "tags.adaseg.dvc_exp"], str)  # a plain repro: none
