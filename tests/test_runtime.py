"""The embedded local Ray instance: loopback only, as every server of the product; a stage whose
inputs do not fit in its object store spills them, and one that cannot spill says which
setting to change."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, repo_env, tiny_params

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


# --------------------------------------------------------------------------- a full store
#: 3000 source-train samples (images, masks, superpixels: about 84 MiB in the object store)
#: against the smallest store Ray allows
SMALL_STORE_MB = 78


@pytest.fixture(scope="module")
def big_inputs(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("store")
    raw = tiny_params()
    raw["data"]["splits"]["source_train"] = 3000
    raw["data"]["shard_size"] = 500
    raw["runtime"]["object_store_memory_mb"] = SMALL_STORE_MB
    raw["pretrain"]["epochs"] = 1
    (base / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    _adaseg(base, "prepare", "--out", "data")
    return base


def _adaseg(base: Path, *args: str, env=None, check=True) -> subprocess.CompletedProcess:
    cmd = ["adaseg", "--params", str(base / "params.yaml"), *args]
    env = {**repo_env(ROOT), **(env or {})}
    proc = subprocess.run(cmd, cwd=base, env=env, capture_output=True, text=True, timeout=900)
    assert not check or proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _pretrain(out: str, *sets: str) -> list[str]:
    return [*sets, "pretrain", "--data", "data", "--out", f"{out}/model"] + [
        *("--metrics", f"{out}/m.json", "--plots", f"{out}/p.csv")
    ]


@pytest.mark.slow
def test_inputs_larger_than_the_object_store_are_spilled_not_refused(big_inputs):
    spill = big_inputs / "spill"
    _adaseg(big_inputs, *_pretrain("ok", "-S", f"runtime.object_spilling_dir={spill}"))
    assert json.loads((big_inputs / "ok/m.json").read_text())["epoch"] == 1
    assert (big_inputs / "ok/model/model.pt").is_file()
    # Ray made the folder it spills to (its files go when their objects do); that these inputs
    # do need the disk is the next test's: the same run with no disk to spill to fails
    assert spill.is_dir(), "runtime.object_spilling_dir did not reach Ray"


@pytest.mark.slow
def test_a_store_that_cannot_spill_names_the_setting_to_raise(big_inputs):
    # Ray's own switch for "the spill disk is full": every spill and disk fallback refused
    full_disk = {"RAY_local_fs_capacity_threshold": "0"}
    proc = _adaseg(big_inputs, *_pretrain("full"), env=full_disk, check=False)
    assert proc.returncode == 3, proc.stderr[-3000:]
    err = proc.stderr
    assert "object store is full" in err and "Local disk is full" in err
    assert f"runtime.object_store_memory_mb (now {SMALL_STORE_MB} MiB)" in err
    assert "runtime.object_spilling_dir" in err
    assert "Traceback" not in err
    assert not (big_inputs / "full").exists()  # nothing half-written
