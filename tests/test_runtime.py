"""The embedded local Ray instance: loopback only, as every server of the product."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT, repo_env

PROBE = """
import json, os
import psutil, ray
from components.config import RuntimeConfig
from components.runtime import init_ray
init_ray(RuntimeConfig(num_cpus=1, object_store_memory_mb=100))
ray.get(ray.remote(lambda: 1).remote())  # a worker process, too
me = psutil.Process()
pids = {p.pid for p in me.children(recursive=True)} | {me.pid}
addrs = sorted({c.laddr.ip for c in psutil.net_connections("inet")
                if c.status == "LISTEN" and c.pid in pids})
print(json.dumps({"listen": addrs, "node": ray.util.get_node_ip_address()}))
ray.shutdown()
"""


def test_the_local_instance_listens_on_loopback_only():
    proc = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=ROOT,
        env=repo_env(ROOT),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["node"] == "127.0.0.1"
    assert seen["listen"], "no listening socket found"
    loopback = ("127.", "::ffff:127.", "::1")
    assert all(a.startswith(loopback) for a in seen["listen"]), seen["listen"]
