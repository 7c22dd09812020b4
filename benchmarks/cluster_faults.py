"""The scale-out path, measured: the tiny pipeline local vs on a one-machine Ray cluster, and
what each injected fault costs.

    python benchmarks/cluster_faults.py --work /tmp/faults [--repeats 2]

``--work`` is an empty (or absent) folder: it gets a tiny-params repository (the tests' one:
``tests.conftest.make_tiny_repo``) and the clusters' state. The clusters are the tests' own
(``tests/cluster_harness.py``): a head without CPUs and 2-CPU worker nodes, on 127.0.0.1, token
authentication on.

1. ``dvc repro -f`` of the tiny pipeline, ``--repeats`` times locally, then as often on a head
   + 1 worker node (``RAY_ADDRESS``), wall time of each.
2. Faults, each against the same command run uninterrupted in the same place, on a head + 2
   worker nodes (a lost node's work needs somewhere to go) unless said otherwise:

   * ``lost_node``: the worker node running ``pretrain`` (6 epochs) killed after its second
     checkpoint (``runtime.max_failures=2``);
   * ``killed_driver``: ``pretrain``'s whole process group ``kill -9``-ed after its second
     checkpoint, then the same command again;
   * ``lost_trial_node``: a 4-trial sweep (4 epochs a trial) whose first checkpointed trial's
     node is killed (``tune.max_failures=1``);
   * ``mlflow_restart``: the MLflow server (``infra/mlflow/server.sh``) stopped after
     ``pretrain``'s second checkpoint and started again 10 s later (local Ray);
   * ``small_store``: ``pretrain`` on 3000 source-train samples (about 84 MiB of inputs) with
     a 78 MiB object store against a 512 MiB one (local Ray): the cost of spilling.

   Time lost = faulty wall (kill to finish included; for ``killed_driver`` both invocations)
   minus the uninterrupted wall; "resumed after" = the epoch the restarted attempt started
   after (``adaseg.train_attempts``), "finished at the fault" = epochs checkpointed by then.

Writes ``benchmarks/results/cluster_faults.json``. One run of every fault; timings on a shared
2-core machine vary by several seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.cluster_harness import OneMachineCluster  # noqa: E402
from tests.conftest import make_tiny_repo, mlflow_runs, repo_env, tune_cmd  # noqa: E402
from tests.test_mlflow_server import Server  # noqa: E402

OUT = ROOT / "benchmarks/results/cluster_faults.json"


def timed(cmd: list[str], cwd: Path, env: dict) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def set_runtime(repo: Path, **values) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["runtime"].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def pretrain(out: str, epochs: int, *sets: str) -> list[str]:
    return [
        *("adaseg", "-S", f"pretrain.epochs={epochs}", *sets, "pretrain", "--data"),
        *("data/prepared", "--out", f"{out}/model", "--metrics", f"{out}/m.json"),
        *("--plots", f"{out}/p.csv"),
    ]


def checkpoints(storage: Path, pattern: str) -> list[dict]:
    import torch

    found = []
    for path in sorted(storage.glob(pattern)):
        with contextlib.suppress(OSError, RuntimeError, EOFError):  # being written
            found.append(torch.load(path, map_location="cpu", weights_only=True))
    return found


def start(cmd: list[str], cwd: Path, env: dict) -> tuple[subprocess.Popen, float]:
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    return proc, time.perf_counter()


def wait_epochs(proc, storage: Path, pattern: str, epochs: int) -> dict:
    """The newest checkpoint state once one with ``epochs`` finished epochs exists."""
    while True:
        states = [s for s in checkpoints(storage, pattern) if s["epoch"] >= epochs]
        if states:
            return max(states, key=lambda s: s["epoch"])
        if proc.poll() is not None:
            sys.exit("the command ended before the fault could be injected")
        time.sleep(0.2)


def finish(proc: subprocess.Popen, t0: float) -> float:
    if proc.wait() != 0:
        sys.exit(f"the faulty run failed ({proc.returncode})")
    return time.perf_counter() - t0


def attempts_of(repo: Path, epochs: int) -> list[dict]:
    runs = mlflow_runs(repo)
    mine = runs[(runs["params.pretrain.epochs"] == str(epochs)) & (runs["status"] == "FINISHED")]
    return json.loads(mine.sort_values("start_time").iloc[-1]["tags.adaseg.train_attempts"])


def local_vs_cluster(work: Path, repo: Path, repeats: int) -> dict:
    local = [timed(["dvc", "repro", "-f"], repo, repo_env(repo)) for _ in range(repeats)]
    cluster = OneMachineCluster(work / "cluster1", workers=1, cpus=2)
    try:
        set_runtime(repo, storage_path=str(work / "shared/ray_results"), train_cpus=2)
        env = cluster.stage_env(repo)
        remote = [timed(["dvc", "repro", "-f"], repo, env) for _ in range(repeats)]
    finally:
        cluster.shutdown()
        set_runtime(repo, storage_path=".adaseg/ray_results", train_cpus=None)
    return {"local_s": local, "cluster_s": remote}


def node_faults(work: Path, repo: Path) -> dict:
    cluster = OneMachineCluster(work / "cluster2", workers=2, cpus=2)
    storage = work / "shared/faults"
    set_runtime(repo, storage_path=str(storage), train_cpus=2, max_failures=2)
    out = {}
    try:
        env = cluster.stage_env(repo)
        epochs = 6
        base = timed(pretrain("b/lost", epochs), repo, env)
        proc, t0 = start(pretrain("f/lost", epochs), repo, env)
        state = wait_epochs(proc, storage, "pretrain-*/checkpoint_*/state.pt", 2)
        (node,) = set(state["attempts"][-1]["nodes"])
        cluster.kill(node)
        faulty = finish(proc, t0)
        cluster.add_worker()
        resumed = attempts_of(repo, epochs)[-1]["after_epoch"]
        out["lost_node"] = {
            "baseline_s": base,
            "faulty_s": faulty,
            "lost_s": faulty - base,
            "finished_at_fault": state["epoch"],
            "resumed_after": resumed,
            "epochs": epochs,
        }

        epochs = 5
        base = timed(pretrain("b/driver", epochs), repo, env)
        cmd = pretrain("f/driver", epochs)
        proc, t0 = start(cmd, repo, env)
        state = wait_epochs(proc, storage, "pretrain-*/checkpoint_*/state.pt", 2)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        first = time.perf_counter() - t0
        again = timed(cmd, repo, env)
        resumed = attempts_of(repo, epochs)[-1]["after_epoch"]
        out["killed_driver"] = {
            "baseline_s": base,
            "faulty_s": first + again,
            "lost_s": first + again - base,
            "finished_at_fault": state["epoch"],
            "resumed_after": resumed,
            "epochs": epochs,
        }

        sweep = ("-S", "tune.epochs=4", "-S", "tune.scheduler=fifo", "-S", "tune.max_failures=1")
        base = timed(tune_cmd("base", "b/tune", *sweep), repo, env)
        proc, t0 = start(tune_cmd("lost", "f/tune", *sweep), repo, env)
        state = wait_epochs(proc, storage / "tune", "lost-*/*/checkpoint_*/state.pt", 1)
        (node,) = set(state["attempts"][-1]["nodes"])
        cluster.kill(node)
        faulty = finish(proc, t0)
        cluster.add_worker()
        table = json.loads((repo / "f/tune/tune.json").read_text())
        out["lost_trial_node"] = {
            "baseline_s": base,
            "faulty_s": faulty,
            "lost_s": faulty - base,
            "trials": table["trials"],
            "failed_trials": table["failed"],
            "epochs": 4,
        }
    finally:
        cluster.shutdown()
        set_runtime(repo, storage_path=".adaseg/ray_results", train_cpus=None, max_failures=0)
    return out


def local_faults(work: Path, repo: Path) -> dict:
    out = {}
    srv = Server(work / "mlflow")
    srv.start()
    try:
        env = {**repo_env(repo), "MLFLOW_TRACKING_URI": srv.url}
        storage = repo / ".adaseg/ray_results"
        epochs = 6
        base = timed(pretrain("b/mlflow", epochs), repo, env)
        proc, t0 = start(pretrain("f/mlflow", epochs), repo, env)
        wait_epochs(proc, storage, "pretrain-*/checkpoint_*/state.pt", 2)
        srv.stop()
        time.sleep(10)
        srv.start()
        faulty = finish(proc, t0)
        out["mlflow_restart"] = {
            "baseline_s": base,
            "faulty_s": faulty,
            "lost_s": faulty - base,
            "server_down_s": 10,
            "epochs": epochs,
        }
    finally:
        srv.stop()

    big = work / "big"
    big.mkdir(exist_ok=True)
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    raw["data"]["splits"]["source_train"] = 3000
    raw["data"]["shard_size"] = 500
    raw["pretrain"]["epochs"] = 1
    (big / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    env = repo_env(big)
    timed(["adaseg", "prepare", "--out", "data/prepared"], big, env)
    walls = {}
    for mb in (512, 78, 512, 78):  # interleaved
        cmd = pretrain(f"s{mb}", 1, "-S", f"runtime.object_store_memory_mb={mb}")
        walls.setdefault(mb, []).append(timed(cmd, big, env))
    out["small_store"] = {
        "baseline_s": statistics.mean(walls[512]),
        "faulty_s": statistics.mean(walls[78]),
        "lost_s": statistics.mean(walls[78]) - statistics.mean(walls[512]),
        "walls_512mib_s": walls[512],
        "walls_78mib_s": walls[78],
    }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    work = args.work.resolve()
    repo = work / "repo"
    if not (repo / "dvc.lock").is_file():
        repo.mkdir(parents=True, exist_ok=True)
        make_tiny_repo(repo)
    result = {"repro": local_vs_cluster(work, repo, args.repeats)}
    result["faults"] = {**node_faults(work, repo), **local_faults(work, repo)}
    result["cpus"] = os.cpu_count()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
