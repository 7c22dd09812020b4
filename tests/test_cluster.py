"""The scale-out path on one machine: a real multi-node Ray cluster (a head without CPUs and two
worker nodes, every node on 127.0.0.1, token authentication on), joined by the stages through
``RAY_ADDRESS`` as a user's cluster would be.

* ``dvc repro -f`` of the tiny pipeline on the cluster: training ran on the worker nodes (their
  ids on each training stage's MLflow run), every output is back in the repository, DVC sees it
  up to date, and the metrics equal the local run's.
* a worker node lost mid-phase: Ray Train restarts the workers on the other node from the last
  checkpoint (``runtime.max_failures``), the stage finishes, every epoch is recorded once, and
  the model equals an uninterrupted run's.
* a sweep on the cluster whose trials' node is lost mid-trial: Tune retries them on the other
  node from their last checkpoints (``tune.max_failures``), the sweep finishes, one MLflow
  run per trial.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
import torch
import yaml

from tests.cluster_harness import OneMachineCluster
from tests.conftest import (
    dvc_metrics,
    mlflow_runs,
    repo_env,
    run_in,
    sweep_children,
    tune_cmd,
)

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

#: CPUs of each worker node: one training run (runtime.train_cpus = 2, the local run's
#: threads) fits on either, so a lost node's work has somewhere to go.
NODE_CPUS = 2


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = OneMachineCluster(tmp_path_factory.mktemp("cluster"), workers=2, cpus=NODE_CPUS)
    yield c
    c.shutdown()


def _run(repo: Path, env: dict, *cmd: str, timeout=1200) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _copy(repo: Path, dst: Path) -> Path:
    shutil.copytree(repo, dst, ignore=shutil.ignore_patterns(".adaseg", "mlruns.db"))
    run_in(dst, "dvc", "repro")  # in step with its own dvc.lock, whatever ran before
    return dst


def _set_runtime(repo: Path, **values) -> None:
    """``runtime`` is no DVC dependency: where the work runs never changes a result."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["runtime"].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _wait_for(proc: subprocess.Popen, probe, timeout=600):
    """``probe()`` once it returns something, or its None when ``proc`` ended or time ran out."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and probe() is None:
        time.sleep(0.2)
    return probe()


def test_nodes_listen_on_loopback_only(cluster):
    addrs = {
        c.laddr.ip
        for c in psutil.net_connections("inet")
        if c.status == "LISTEN" and c.pid in cluster.pids()
    }
    assert addrs, "no listening socket found"
    assert all(a.startswith(("127.", "::ffff:127.", "::1")) for a in addrs), addrs


def test_repro_on_the_cluster_equals_the_local_run(cluster, repo, tmp_path):
    work = _copy(repo, tmp_path / "work")
    local = dvc_metrics(work)
    storage = tmp_path / "shared/ray_results"
    _set_runtime(work, storage_path=str(storage), train_cpus=NODE_CPUS)
    out = _run(work, cluster.stage_env(work), "dvc", "repro", "-f").stdout
    assert "Running stage 'adapt'" in out
    assert "up to date" in run_in(work, "dvc", "status", "dvc.yaml").stdout  # the default DAG
    assert (work / "models/sda/model.pt").is_file()  # outputs land next to dvc.yaml
    assert dvc_metrics(work) == local

    runs = mlflow_runs(work)
    trained = runs[runs["tags.adaseg.stage"].isin(["pretrain", "oracle", "init", "masks", "adapt"])]
    assert len(trained) == 5 and (trained["status"] == "FINISHED").all()
    workers, head = set(cluster.workers), cluster.head
    for _, run in trained.iterrows():
        nodes = set(run["tags.adaseg.train_nodes"].split(","))
        assert nodes and nodes <= workers and head not in nodes, run["tags.adaseg.stage"]
        assert run["tags.adaseg.ray_storage"].startswith(str(storage))
        assert run["tags.adaseg.train_restarts"] == "0"


def _pretrain(out: str, epochs: int) -> list[str]:
    return [
        *("adaseg", "-S", f"pretrain.epochs={epochs}", "pretrain", "--data", "data/prepared"),
        *("--out", f"{out}/model", "--metrics", f"{out}/m.json", "--plots", f"{out}/p.csv"),
    ]


def test_a_lost_worker_node_costs_a_restart_not_the_stage(cluster, repo, tmp_path):
    work = _copy(repo, tmp_path / "work")
    storage = tmp_path / "shared/ray_results"
    _set_runtime(work, storage_path=str(storage), train_cpus=NODE_CPUS, max_failures=2)
    epochs = 6
    env = cluster.stage_env(work)
    proc = subprocess.Popen(
        _pretrain("lost", epochs),
        cwd=work,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )

    def first_checkpoint() -> Path | None:
        # registered in Ray Train's snapshot, so a restart will be handed it
        for snap in storage.glob("pretrain-*/checkpoint_manager_snapshot.json"):
            if "checkpoint_" in snap.read_text():
                found = sorted(snap.parent.glob("checkpoint_*/state.pt"))
                return found[0] if found else None
        return None

    ckpt = _wait_for(proc, first_checkpoint)
    assert ckpt is not None, "no checkpoint in runtime.storage_path"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["epoch"] < epochs, "training ended before the node could be taken away"
    (node,) = set(state["attempts"][0]["nodes"])
    cluster.kill(node)
    log = proc.communicate(timeout=900)[0]
    assert proc.returncode == 0, log[-4000:]
    cluster.add_worker()  # capacity back for the other tests

    history = pd.read_csv(work / "lost/p.csv")
    assert history["epoch"].tolist() == list(range(1, epochs + 1))  # every epoch once
    runs = mlflow_runs(work)
    mine = runs[runs["params.pretrain.epochs"] == str(epochs)]
    assert len(mine) == 1 and mine.iloc[0]["status"] == "FINISHED"
    run = mine.iloc[0]
    assert run["tags.adaseg.train_restarts"] == "1"
    first, second = json.loads(run["tags.adaseg.train_attempts"])
    assert first["nodes"] == [node] and second["nodes"] != [node]
    assert second["after_epoch"] >= 1  # resumed from a checkpoint, not from scratch
    import mlflow

    client = mlflow.tracking.MlflowClient()
    assert len(client.get_metric_history(run["run_id"], "val_oiou")) == epochs

    # the restart is exact: the same weights as a run that never lost a node (here, local)
    _run(work, repo_env(work), *_pretrain("uninterrupted", epochs))
    lost = torch.load(work / "lost/model/model.pt", map_location="cpu", weights_only=True)
    ref = torch.load(work / "uninterrupted/model/model.pt", map_location="cpu", weights_only=True)
    assert lost.keys() == ref.keys()
    assert all(torch.equal(lost[k], ref[k]) for k in ref)


def test_a_sweep_survives_losing_the_node_its_trials_run_on(cluster, repo, tmp_path):
    work = _copy(repo, tmp_path / "work")
    storage = tmp_path / "shared/ray_results"
    _set_runtime(work, storage_path=str(storage))
    epochs = 4
    cmd = tune_cmd(
        "lost",
        "lost",
        *("-S", f"tune.epochs={epochs}", "-S", "tune.scheduler=fifo", "-S", "tune.max_failures=1"),
    )
    proc = subprocess.Popen(
        cmd,
        cwd=work,
        env=cluster.stage_env(work),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )

    def a_trial_checkpoint() -> dict | None:
        for path in sorted((storage / "tune").glob("lost-*/*/checkpoint_*/state.pt")):
            try:
                return torch.load(path, map_location="cpu", weights_only=True)
            except (OSError, RuntimeError, EOFError):  # being written
                continue
        return None

    state = _wait_for(proc, a_trial_checkpoint)
    assert state is not None, "no trial checkpoint in runtime.storage_path"
    assert state["epoch"] < epochs, "the trial ended before its node could be taken away"
    (node,) = set(state["attempts"][-1]["nodes"])
    assert node in cluster.workers
    cluster.kill(node)
    log = proc.communicate(timeout=900)[0]
    assert proc.returncode == 0, log[-4000:]
    cluster.add_worker()  # capacity back for the other tests

    table = pd.read_parquet(work / "lost/tune/trials.parquet")
    assert len(table) == 4 and (table.status == "COMPLETED").all()
    children = sweep_children(work, "lost")
    assert len(children) == 4 and set(children.status) == {"FINISHED"}
    moved = children[children["tags.adaseg.trial_nodes"].str.contains(node)]
    assert len(moved) >= 1  # the trial whose checkpoint named the node, at least
    assert set(moved["tags.adaseg.trial_restarts"]) == {"1"}
    import mlflow

    client = mlflow.tracking.MlflowClient()
    for _, child in children.iterrows():
        nodes = child["tags.adaseg.trial_nodes"].split(",")
        assert set(nodes) <= set(cluster.workers) | {node} and cluster.head not in nodes
        steps = {m.step for m in client.get_metric_history(child.run_id, "val_oiou")}
        assert steps == set(range(1, epochs + 1))  # resumed, every epoch there
    for _, child in moved.iterrows():
        assert len(child["tags.adaseg.trial_nodes"].split(",")) == 2  # retried elsewhere
