"""A multi-node Ray cluster on this machine, in a process of its own (``tests/test_cluster.py``).

    python -m tests.cluster_harness --temp-dir DIR --workers 2 --cpus 2

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
import sys

os.environ["RAY_AUTH_MODE"] = "token"
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # node addresses stay 127.0.0.1

from ray.cluster_utils import Cluster  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--temp-dir", required=True)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cpus", type=int, default=2)
    args = ap.parse_args()
    if not os.environ.get("RAY_AUTH_TOKEN"):
        sys.exit("RAY_AUTH_TOKEN is not set")
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
