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


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    state, port = tmp_path_factory.mktemp("mlflow"), _free_port()
    env = {**repo_env(ROOT), "PORT": str(port), "ROOT": str(state)}
    proc = subprocess.Popen(
        ["bash", str(SERVER)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                os.killpg(proc.pid, signal.SIGTERM)
                pytest.fail("the MLflow server did not come up")
            time.sleep(1)
    yield url
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=60)


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
