"""Ray: starting or joining a cluster, and resources for Ray Train workers.

Local by default (a small instance sized for a laptop or a 2-core CI box); ``RAY_ADDRESS`` or
``runtime.ray_address`` joins a cluster instead, shipping this package with the job so the
cluster runs the driver's code.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path

import ray

import components
from components.config import RuntimeConfig

log = logging.getLogger(__name__)


def ray_address(cfg: RuntimeConfig) -> str | None:
    return os.environ.get("RAY_ADDRESS") or cfg.ray_address


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _host(address: str) -> str:
    """``ray://head:10001`` / ``head:6379`` / ``[::1]:6379`` -> the host part."""
    hostport = address.split("://", 1)[-1]
    return hostport.rsplit(":", 1)[0].strip("[]") if ":" in hostport else hostport


#: Loggers of Ray internals quieted in every worker process (see :func:`quiet_worker_logs`).
QUIET_LOGGERS = (
    # Ray Train's placement-group cleaner polls the State API, which a local instance started
    # without the dashboard does not serve: one warning per poll, all through training.
    "ray.train.v2._internal.execution.controller.placement_group_cleaner",
)


#: the logger of Ray's "Token authentication is enabled for this Ray cluster" notice
AUTH_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"


def quiet_worker_logs() -> None:
    """Ray ``worker_process_setup_hook``: :data:`QUIET_LOGGERS` below ERROR.

    Also points the worker's State API client at its own instance: with several local
    instances on one machine (units of a comparison at once, a test suite next to a run) it
    otherwise cannot pick one and the cleaner's thread dies with a traceback.
    """
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    # "Reporting training result ..." once per epoch, from a logger named after its file
    # (so Ray Train's own log level does not reach it)
    spec = importlib.util.find_spec("ray.train.v2._internal.execution.context")
    if spec and spec.origin and train_log_level() != "INFO":
        logging.getLogger(spec.origin).setLevel(logging.WARNING)
    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)


def quiet_driver_logs() -> None:
    """A local run's console: worker lines without Ray's ``(RayTrainWorker pid=...)`` prefix and
    its colour codes (our lines name their stage: ``pretrain epoch 3/8: ...``).
    ``ADASEG_RAY_VERBOSE=1`` keeps Ray's prefixes. Ray reads its switch when imported, so the
    imported copy is set too (as :func:`use_loopback` does)."""
    if os.environ.get("ADASEG_RAY_VERBOSE") == "1":
        return
    os.environ.setdefault("RAY_DISABLE_WORKER_LOG_PREFIX", "1")
    from ray._private import ray_constants

    ray_constants.RAY_DISABLE_WORKER_LOG_PREFIX = ray_constants.env_bool(
        "RAY_DISABLE_WORKER_LOG_PREFIX", False
    )


def train_log_level() -> str:
    """Ray Train's own log level: WARNING, so an epoch is one line of ours instead of four
    (worker-group start, "Checkpoint successfully created", "Reporting training result");
    ``ADASEG_RAY_VERBOSE=1`` brings Ray Train's INFO lines back."""
    return "INFO" if os.environ.get("ADASEG_RAY_VERBOSE") == "1" else "WARNING"


def use_loopback() -> None:
    """Make the local instance listen on 127.0.0.1 only.

    Ray otherwise takes the machine's network address as the node's, and its servers (GCS,
    raylet, workers) listen there. With clusters disabled (the switch Ray reads on every
    platform; it is named for the platforms where that is the default) the node address is
    127.0.0.1 and every server binds to it. Ray reads the switch from the environment when it
    is imported, so this process's copy is set too; the processes the instance starts inherit
    the environment. Joining a real cluster (``RAY_ADDRESS``) never comes here.
    ``tests/test_runtime.py`` checks the listening sockets, so a Ray upgrade that moves the
    switch is caught. ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1`` opts out.
    """
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0":
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False


def init_ray(cfg: RuntimeConfig) -> None:
    """Start a local Ray instance, or connect to the configured cluster (idempotent)."""
    if ray.is_initialized():
        return
    # Workers must never inherit a parent MLflow run: only the driver logs.
    os.environ.pop("MLFLOW_RUN_ID", None)
    # Ray Train V2 re-logs every print of a worker whose stdout Ray redirects, so each line
    # reached the console twice; a user who wants Train's print capture sets it back to 1.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    hook = f"{__name__}.{quiet_worker_logs.__name__}"
    address = ray_address(cfg)
    if address:
        # the stages' set-up functions live in pipelines/, the rest in components/
        here = Path(components.__file__).parent
        pkgs = [str(here), str(here.parent / "pipelines")]
        runtime_env = {"py_modules": pkgs, "worker_process_setup_hook": hook}
        if _host(address) in LOOPBACK:
            use_loopback()  # a cluster on loopback (tests, one machine) is joined from loopback
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        log.info("joined Ray cluster at %s", address)
        return
    # one node, no spot instances: Ray Train's preemption watcher has nothing to watch
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # Ray turns token authentication on for a new local instance (a token in
    # ~/.ray/auth_token, made if missing) and says so at every start: kept on, not announced
    logging.getLogger(AUTH_NOTICE_LOGGER).setLevel(logging.ERROR)
    # the Train controller polls its workers every 2 s by default: a training stage waited up
    # to a poll to start and another to finish
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    quiet_driver_logs()
    use_loopback()
    extra = {}
    if cfg.object_spilling_dir:  # objects beyond object_store_memory_mb go there
        spill = {"type": "filesystem", "params": {"directory_path": cfg.object_spilling_dir}}
        extra["_system_config"] = {"object_spilling_config": json.dumps(spill)}
    ray.init(
        # "local": always a new instance of our own. Without an address Ray joins the last
        # cluster `ray start` (or a test cluster) advertised on this machine, and then
        # refuses num_cpus; joining a cluster is RAY_ADDRESS's job.
        address="local",
        num_cpus=cfg.num_cpus or os.cpu_count(),
        include_dashboard=False,
        object_store_memory=cfg.object_store_memory_mb * 2**20,
        log_to_driver=True,
        logging_level=logging.WARNING,
        runtime_env={"worker_process_setup_hook": hook},
        **extra,
    )


def object_store_advice(exc: BaseException, cfg: RuntimeConfig) -> str | None:
    """What to do when ``exc`` (or what caused it, also from a worker) is Ray's object store
    running out of room with no disk left to spill to; None for any other error.

    Objects larger than the store, or more of them than fit, are spilled to disk by Ray (a
    stage's inputs live in the store): only a full spill disk ends a stage."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = str(exc)
        if isinstance(exc, ray.exceptions.ObjectStoreFullError | ray.exceptions.OutOfDiskError) or (
            "ObjectStoreFullError" in text or "OutOfDiskError" in text
        ):
            first = next((ln for ln in text.splitlines() if ln.strip()), type(exc).__name__)
            where = (
                f"the nodes' `ray start --object-store-memory` (cluster {ray_address(cfg)})"
                if ray_address(cfg)
                else f"runtime.object_store_memory_mb (now {cfg.object_store_memory_mb} MiB)"
            )
            spill = cfg.object_spilling_dir or "Ray's temp dir (/tmp/ray unless RAY_TMPDIR)"
            return (
                f"Ray's object store is full and its objects cannot be spilled to disk ({first}). "
                f"Raise {where}, or give Ray disk to spill to: free space in {spill} or set "
                "runtime.object_spilling_dir to a larger disk. The stage's outputs are written "
                "whole or not at all; re-run when done."
            )
        exc = exc.__cause__ or exc.__context__
    return None


def resolve_use_gpu(flag) -> bool:
    """``auto`` -> True iff the connected cluster has a GPU."""
    if flag == "auto":
        return ray.cluster_resources().get("GPU", 0) > 0
    return bool(flag)


def node_cpus() -> int:
    """CPUs of the largest live node: what one task or one training worker can get (neither
    spans nodes; asking for more than any node has waits forever)."""
    sizes = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
    return max(1, int(max(sizes, default=1)))


def cpus_per_worker(num_workers: int, budget: int | None = None) -> int:
    """Split the cluster's CPUs (at most ``budget`` of them: ``runtime.train_cpus``) evenly
    across training workers (at least one each, at most a node's)."""
    total = int(ray.cluster_resources().get("CPU", 1))
    if budget:
        total = min(total, budget)
    return max(1, min(total // num_workers, node_cpus()))


def storage_path(cfg: RuntimeConfig, root: Path) -> str:
    """Absolute Ray storage path (Ray refuses relative ones); URIs pass through."""
    return resolve_storage(cfg.storage_path, root)


def resolve_storage(path_or_uri: str, root: Path) -> str:
    """``path_or_uri`` made absolute against ``root``; URIs (``s3://...``) pass through."""
    if "://" in path_or_uri:
        return path_or_uri
    path = Path(path_or_uri)
    return str(path if path.is_absolute() else (root / path).resolve())


def remove_storage(uri_or_path: str) -> None:
    """Delete a finished run's Ray storage folder (local path or object-store URI)."""
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(
        uri_or_path if "://" in uri_or_path else Path(uri_or_path).resolve().as_uri()
    )
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)
