"""What every stage's thin door shares: logging set-up, params loading, the repo root."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from components.config import Params, load_params


def setup_logging() -> None:
    logging.basicConfig(
        level=os.environ.get("ADASEG_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # creating / migrating the local tracking database is not news on every first run
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)


def repo_root() -> Path:
    """The folder stages run in (DVC runs them from the repo root)."""
    return Path.cwd()


def read_params(path: str, overrides: list[str] | None = None) -> Params:
    """Validate params once, at the boundary; ``overrides`` are ``key=value`` strings (YAML)."""
    import yaml

    parsed = {}
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"-S {item!r}: expected key=value")
        parsed[key] = yaml.safe_load(value)
    return load_params(path, parsed)
