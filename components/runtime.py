"""Ray: starting or joining a cluster, and resources for Ray Train workers.

Local by default (a small instance sized for a laptop or a 2-core CI box); ``RAY_ADDRESS`` or
``runtime.ray_address`` joins a cluster instead, shipping this package with the job so the
cluster runs the driver's code.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import ray

import components
from components.config import RuntimeConfig

log = logging.getLogger(__name__)


def ray_address(cfg: RuntimeConfig) -> str | None:
    return os.environ.get("RAY_ADDRESS") or cfg.ray_address


def init_ray(cfg: RuntimeConfig) -> None:
    """Start a local Ray instance, or connect to the configured cluster (idempotent)."""
    if ray.is_initialized():
        return
    # Workers must never inherit a parent MLflow run: only the driver logs.
    os.environ.pop("MLFLOW_RUN_ID", None)
    address = ray_address(cfg)
    if address:
        pkg = str(Path(components.__file__).parent)
        ray.init(address=address, runtime_env={"py_modules": [pkg]}, log_to_driver=True)
        log.info("joined Ray cluster at %s", address)
        return
    ray.init(
        num_cpus=cfg.num_cpus or os.cpu_count(),
        include_dashboard=False,
        object_store_memory=cfg.object_store_memory_mb * 2**20,
        log_to_driver=True,
        logging_level=logging.WARNING,
    )


def resolve_use_gpu(flag) -> bool:
    """``auto`` -> True iff the connected cluster has a GPU."""
    if flag == "auto":
        return ray.cluster_resources().get("GPU", 0) > 0
    return bool(flag)


def cpus_per_worker(num_workers: int, budget: int | None = None) -> int:
    """Split the cluster's CPUs (at most ``budget`` of them: ``runtime.train_cpus``) evenly
    across training workers (at least one each)."""
    total = int(ray.cluster_resources().get("CPU", 1))
    if budget:
        total = min(total, budget)
    return max(1, total // num_workers)


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
