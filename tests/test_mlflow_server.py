"""A real MLflow tracking server (``infra/mlflow/server.sh``) on loopback: a stage logs to it
through ``MLFLOW_TRACKING_URI``, and its run, metrics and artefact are read back through the
REST API; the script refuses a non-loopback address unless told otherwise."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import ROOT, repo_env, tiny_params

pytestmark = pytest.mark.slow
SERVER = ROOT / "infra/mlflow/server.sh"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


class Server:
    """``infra/mlflow/server.sh`` on a loopback port, stopped and started again at will (its
    database and artefacts stay in ``state``)."""

    def __init__(self, state: Path):
        self.state, self.port = state, _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = {**repo_env(ROOT), "PORT": str(self.port), "ROOT": str(self.state)}
        self.proc = subprocess.Popen(
            ["bash", str(SERVER)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=2)
                return
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    self.stop()
                    pytest.fail("the MLflow server did not come up")
                time.sleep(0.5)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=60)

    def runs(self, stage: str) -> list[dict]:
        api = f"{self.url}/api/2.0/mlflow"
        exp = _get(f"{api}/experiments/get-by-name?experiment_name=adaseg")["experiment"]
        body = {
            "experiment_ids": [exp["experiment_id"]],
            "filter": f"tags.`adaseg.stage` = '{stage}'",
        }
        return _post(f"{api}/runs/search", body).get("runs", [])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("mlflow"))
    s.start()
    yield s.url
    s.stop()


def test_a_stage_logs_to_the_server_and_reads_back_over_rest(server, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    env = {**repo_env(ROOT), "MLFLOW_TRACKING_URI": server}
    out = tmp_path / "data"
    cmd = ["adaseg", "--params", str(params), "prepare", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    api = f"{server}/api/2.0/mlflow"
    exp = _get(f"{api}/experiments/get-by-name?experiment_name=adaseg")["experiment"]
    runs = _post(
        f"{api}/runs/search",
        {"experiment_ids": [exp["experiment_id"]], "filter": "tags.`adaseg.stage` = 'prepare'"},
    )["runs"]
    assert len(runs) == 1
    run = runs[0]
    assert run["info"]["status"] == "FINISHED"
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    assert metrics["n_source_train"] == tiny_params()["data"]["splits"]["source_train"]
    arts = _get(f"{api}/artifacts/list?run_id={run['info']['run_id']}")
    assert "stats.json" in {f["path"] for f in arts.get("files", [])}
    # the artefact itself, through the server's proxy
    run_id = run["info"]["run_id"]
    got = _get(f"{server}/get-artifact?path=stats.json&run_uuid={run_id}")
    assert got["source_train"]["n"] == metrics["n_source_train"]


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.1"])
def test_the_server_script_refuses_a_non_loopback_address(host, tmp_path):
    env = {**repo_env(ROOT), "HOST": host, "PORT": str(_free_port()), "ROOT": str(tmp_path)}
    proc = subprocess.run(
        ["bash", str(SERVER)], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert f"refusing to bind the MLflow server to {host}" in proc.stderr
    assert "ALLOW_NON_LOOPBACK=1" in proc.stderr
    assert not list(Path(tmp_path).iterdir())  # nothing started, nothing written


# --------------------------------------------------------------------------- a lost server
def _pretrain(repo: Path, out: Path, storage: Path, epochs: int) -> list[str]:
    return [
        *("adaseg", "-S", f"pretrain.epochs={epochs}", "-S", f"runtime.storage_path={storage}"),
        *("pretrain", "--data", str(repo / "data/prepared"), "--out", str(out / "model")),
        *("--metrics", str(out / "m.json"), "--plots", str(out / "p.csv")),
    ]


def _wait_for(check, what: str, proc: subprocess.Popen, timeout=600) -> None:
    deadline = time.time() + timeout
    while not check():
        assert proc.poll() is None, f"the stage ended before {what}"
        assert time.time() < deadline, f"no {what} before the deadline"
        time.sleep(0.2)


def _checkpointed(storage: Path) -> bool:
    return any(storage.glob("pretrain-*/checkpoint_*/state.pt"))


def _history(url: str, run_id: str, key: str) -> list[int]:
    got = _get(f"{url}/api/2.0/mlflow/metrics/get-history?run_id={run_id}&metric_key={key}")
    return sorted(m["step"] for m in got.get("metrics", []))


def test_a_server_restarted_mid_stage_costs_nothing(repo, tmp_path):
    srv, out, storage = Server(tmp_path / "mlflow"), tmp_path / "out", tmp_path / "ray"
    srv.start()
    env = {**repo_env(repo), "MLFLOW_TRACKING_URI": srv.url}
    epochs = 5
    proc = subprocess.Popen(
        _pretrain(repo, out, storage, epochs),
        cwd=repo,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _wait_for(lambda: _checkpointed(storage), "a checkpoint", proc)
        srv.stop()  # the run is open on the server; the stage trains on
        # the stage's DVC outputs are complete while the server is still away
        _wait_for(lambda: (out / "p.csv").is_file(), "its outputs", proc)
        assert json.loads((out / "m.json").read_text())["epoch"] == epochs
        time.sleep(2)  # MLflow's client is backing off by now
        srv.start()
        log = proc.communicate(timeout=600)[0]
        assert proc.returncode == 0, log[-3000:]
        (run,) = srv.runs("pretrain")
        assert run["info"]["status"] == "FINISHED"
        assert _history(srv.url, run["info"]["run_id"], "val_oiou") == list(range(1, epochs + 1))
        tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
        assert tags["adaseg.train_restarts"] == "0"
        assert not list(storage.glob("pretrain-*"))  # tracked, so the checkpoint is gone
    finally:
        proc.kill()
        srv.stop()


def test_a_server_that_stays_away_fails_the_stage_clearly_and_keeps_its_outputs(repo, tmp_path):
    srv, out, storage = Server(tmp_path / "mlflow"), tmp_path / "out", tmp_path / "ray"
    srv.start()
    # one retry instead of seven (about four minutes of backoff) keeps the test short
    env = {**repo_env(repo), "MLFLOW_TRACKING_URI": srv.url, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1"}
    epochs = 4
    cmd = _pretrain(repo, out, storage, epochs)
    proc = subprocess.Popen(
        cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        _wait_for(lambda: _checkpointed(storage), "a checkpoint", proc)
        srv.stop()
        log = proc.communicate(timeout=600)[0]
        assert proc.returncode != 0
        assert f"the MLflow tracking server {srv.url} is unreachable" in log, log[-3000:]
        assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES=1" in log and "re-run" in log
        # every output was written before tracking failed, and the checkpoint is kept
        assert json.loads((out / "m.json").read_text())["epoch"] == epochs
        assert len((out / "p.csv").read_text().splitlines()) == epochs + 1
        first = torch.load(out / "model/model.pt", map_location="cpu", weights_only=True)
        assert _checkpointed(storage)

        srv.start()  # back: the re-run resumes after the last epoch and tracks
        again = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
        assert again.returncode == 0, again.stderr[-3000:]
        assert f"resuming after epoch {epochs}/{epochs}" in again.stdout + again.stderr
        second = torch.load(out / "model/model.pt", map_location="cpu", weights_only=True)
        assert all(torch.equal(first[k], second[k]) for k in first)  # nothing trained again
        (run,) = srv.runs("pretrain")  # the first attempt's run, continued
        assert run["info"]["status"] == "FINISHED"
        tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
        assert tags["adaseg.attempts"] == "2"
        assert _history(srv.url, run["info"]["run_id"], "val_oiou") == list(range(1, epochs + 1))
    finally:
        proc.kill()
        srv.stop()
