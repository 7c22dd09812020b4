"""How the methods comparison's wall time scales with the CPUs Ray has.

    python benchmarks/compare_scaling.py --repo /tmp/scale

``--repo`` is a clone of this repository. The same reduced comparison (3 methods x 2 tasks x
1 seed on a smaller benchmark and schedule, 15 units; ``REDUCED`` below) runs from scratch
under each setting, in its own work folder, with every unit logging to one MLflow server on
127.0.0.1 (``infra/mlflow/server.sh``: units running at once would contend for a SQLite file):

* ``1cpu``: the whole process tree pinned to one core (``taskset``), a 1-CPU Ray instance,
  one unit at a time;
* ``2cpu_serial``: two cores, one unit at a time, its training on 2 threads;
* ``2cpu_parallel``: two cores, two units at a time (``compare.cpus_per_run=1``), 1 thread each.

From the units' own timings (``compare/work/.stamps``) it also derives the critical path of
the unit DAG: no cluster, however large, runs this comparison faster than that.
Writes ``benchmarks/results/compare_scaling.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.common import read_params  # noqa: E402
from pipelines.compare import plan  # noqa: E402

REDUCED = {
    "compare.methods": "[sda, dacs, mmd]",
    "compare.tasks": "[referring, semantic]",
    "compare.seeds": "[0]",
    "data.splits.source_train": 500,
    "data.splits.source_val": 100,
    "data.splits.target_train": 500,
    "data.splits.target_val": 100,
    "data.splits.target_test": 200,
    "pretrain.epochs": 2,
    "oracle.epochs": 2,
    "init.epochs": 1,
    "masks.epochs": 1,
    "adapt.epochs": 1,
}
SETTINGS = {
    "1cpu": ({"runtime.num_cpus": 1, "compare.cpus_per_run": 1}, "0"),
    "2cpu_serial": ({"runtime.num_cpus": 2, "compare.cpus_per_run": 2}, None),
    "2cpu_parallel": ({"runtime.num_cpus": 2, "compare.cpus_per_run": 1}, None),
}


def _env() -> dict:
    """This environment, with this interpreter's scripts (mlflow, adaseg) first on PATH."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(port: int, timeout: float = 120.0) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return
        except OSError:
            time.sleep(1)
    sys.exit(f"MLflow server on 127.0.0.1:{port} did not come up")


def critical_path(repo: Path, work: Path, overrides: dict) -> dict:
    """Longest chain of unit wall times through the unit DAG, and the sum of them all."""
    params = read_params(str(repo / "params.yaml"), [f"{k}={v}" for k, v in overrides.items()])
    raw = params.model_dump(mode="json", exclude_none=True)
    units = plan(params, raw, work)
    seconds = {}
    for u in units:
        stamp = work / ".stamps" / f"{u.name.replace('/', '__')}.json"
        seconds[u.name] = json.loads(stamp.read_text())["seconds"]
    finish: dict[str, float] = {}
    for u in units:  # plan() lists dependencies first
        finish[u.name] = seconds[u.name] + max((finish[d] for d in u.deps), default=0.0)
    end = max(finish, key=finish.get)
    chain, name = [], end
    while name:
        chain.append(name)
        deps = next(u.deps for u in units if u.name == name)
        name = max(deps, key=finish.get) if deps else None
    return {
        "units": len(units),
        "sum_unit_s": round(sum(seconds.values()), 1),
        "critical_path_s": round(finish[end], 1),
        "critical_path": chain[::-1],
        "unit_s": seconds,
    }


def run_setting(repo: Path, name: str, port: int) -> dict:
    extra, cores = SETTINGS[name]
    overrides = {**REDUCED, **extra}
    work = repo / f"compare/scaling_{name}"
    shutil.rmtree(work, ignore_errors=True)
    cmd = [sys.executable, "-m", "pipelines.cli"]
    for key, value in overrides.items():
        cmd += ["-S", f"{key}={value}"]
    cmd += ["compare", "--work", str(work), "--out", str(work / "report")]
    cmd += ["--metrics", str(work / "compare.json")]
    if cores is not None:
        cmd = ["taskset", "-c", cores, *cmd]
    env = {**_env(), "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"}
    env.pop("RAY_ADDRESS", None)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"{name} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return {
        "setting": extra,
        "cores": cores or "all",
        "wall_s": round(wall, 1),
        **critical_path(repo, work, {**REDUCED, **extra}),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", type=Path, required=True)
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    args = ap.parse_args()
    repo = args.repo.resolve()
    port = _free_port()
    state = repo / ".adaseg/scaling_mlflow"
    shutil.rmtree(state, ignore_errors=True)
    server = subprocess.Popen(
        ["bash", str(repo / "infra/mlflow/server.sh")],
        env={**_env(), "PORT": str(port), "ROOT": str(state)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        _wait_http(port)
        results = {}
        for name in args.settings:
            results[name] = run_setting(repo, name, port)
            print(name, results[name]["wall_s"], "s", flush=True)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait()
    base = results.get("1cpu", {}).get("wall_s")
    summary = {
        "reduced": REDUCED,
        "machine": f"{os.cpu_count()} cores",
        "results": results,
        "speedup_vs_1cpu": {k: round(base / v["wall_s"], 2) for k, v in results.items()}
        if base
        else {},
    }
    out = ROOT / "benchmarks/results/compare_scaling.json"
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: summary[k] for k in ("speedup_vs_1cpu",)}, indent=2))


if __name__ == "__main__":
    main()
