"""A multi-node Ray cluster on this machine, in a process of its own (``tests/test_cluster.py``).

    python -m tests.cluster_harness --temp-dir DIR --workers 2 --cpus 2

(or, from Python, :class:`OneMachineCluster`, which runs it and speaks its protocol)

A head without CPUs and ``--workers`` worker nodes, every node on 127.0.0.1, token
authentication on (the token comes from ``RAY_AUTH_TOKEN``). It prints one JSON line
(``address``, ``head``, ``workers``: node ids), then reads commands on stdin, answering each
with the worker node ids: ``kill <node id>`` (raylet, object store and workers at once, as a
lost machine), ``add`` (a new worker node). End of input shuts the cluster down.

Its own process because Ray reads its authentication mode once per process: the test process,
which also holds a local instance of its own, cannot start token-authenticated nodes.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import psutil

from tests.conftest import ROOT, repo_env


class OneMachineCluster:
    """A head (no CPUs: it only coordinates) and worker nodes, all on loopback, run by
    ``tests/cluster_harness.py`` in a process of its own."""

    def __init__(self, base: Path, workers: int = 2, cpus: int = 2):
        self.env = {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(32),
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # the driver joins from 127.0.0.1
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.cluster_harness", "--temp-dir", str(base / "ray")]
            + ["--workers", str(workers), "--cpus", str(cpus)],
            cwd=ROOT,
            env={**repo_env(ROOT), **self.env},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        first = self._answer()
        self.address, self.head = first["address"], first["head"]

    def _answer(self) -> dict:
        line = self.proc.stdout.readline()
        assert line, f"the cluster harness exited ({self.proc.poll()})"
        answer = json.loads(line)
        self.workers: list[str] = answer["workers"]
        return answer

    def _command(self, cmd: str) -> None:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        self._answer()

    def kill(self, node_id: str) -> None:
        """Take the worker node ``node_id`` away at once: raylet, object store, workers."""
        self._command(f"kill {node_id}")

    def add_worker(self) -> None:
        self._command("add")

    def stage_env(self, repo: Path) -> dict:
        return {**repo_env(repo), **self.env, "RAY_ADDRESS": self.address}

    def pids(self) -> set[int]:
        return {p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)}

    def shutdown(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=120)
        current = Path("/tmp/ray/ray_current_cluster")  # Ray advertises the cluster there
        if current.is_file() and current.read_text().strip() == self.address:
            current.unlink()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--temp-dir", required=True)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cpus", type=int, default=2)
    args = ap.parse_args()
    if not os.environ.get("RAY_AUTH_TOKEN"):
        sys.exit("RAY_AUTH_TOKEN is not set")
    # read once per process by Ray, hence set before it is imported (and only here)
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # node addresses stay 127.0.0.1
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "node_ip_address": "127.0.0.1",
            "num_cpus": 0,
            "include_dashboard": False,
            "temp_dir": args.temp_dir,
        },
    )

    def add():
        return cluster.add_node(
            node_ip_address="127.0.0.1", num_cpus=args.cpus, object_store_memory=150 * 2**20
        )

    workers = [add() for _ in range(args.workers)]

    def say(**fields) -> None:
        print(json.dumps({"workers": [n.node_id for n in workers], **fields}), flush=True)

    say(address=cluster.address, head=cluster.head_node.node_id)
    try:
        for line in sys.stdin:
            cmd, *rest = line.split()
            if cmd == "kill":
                node = next(n for n in workers if n.node_id == rest[0])
                cluster.remove_node(node, allow_graceful=False)
                workers.remove(node)
            elif cmd == "add":
                workers.append(add())
            say()
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main()
