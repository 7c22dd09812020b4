"""The ``adaseg`` console entry point: one sub-command per stage, plus tools.

Every sub-command reads ``--params`` (default ``params.yaml``), applies ``-S key=value``
overrides, validates everything before doing any work, and takes its paths from argv (the
paths live in ``dvc.yaml`` only).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import shlex
import sys
from pathlib import Path

from components.config import ParamsError
from components.data.schema import DataError
from pipelines.common import read_params, setup_logging

log = logging.getLogger("adaseg")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="adaseg", description=__doc__.splitlines()[0])
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument(
        "-S",
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a param, e.g. -S pretrain.epochs=3 (repeatable)",
    )
    sub = p.add_subparsers(dest="command", required=True)
    for name, (_, what, options) in COMMANDS.items():
        s = sub.add_parser(name, help=what)
        for flag, dest, kwargs in options:
            s.add_argument(flag, dest=dest, **kwargs)
    sub.add_parser("validate", help="validate the params file and exit")
    prof = sub.add_parser(
        "profile",
        help="validate a params overlay of infra/profiles (params file + overlay + -S) and "
        "print the `dvc exp run` that applies it",
    )
    prof.add_argument("name", help="infra/profiles/<name>.yaml, or a path to an overlay file")
    prof.add_argument(
        "--args", action="store_true", help="print only the -S arguments: dvc exp run $(...)"
    )
    return p


def profile_overrides(name: str) -> list[str]:
    """The ``key=value`` overrides of a profile: a flat YAML mapping of dotted params keys.

    Raises:
        ParamsError: naming the file when it is missing or not such a mapping.
    """
    import yaml

    from pipelines.common import repo_root

    path = Path(name) if name.endswith((".yaml", ".yml")) else None
    path = path or repo_root() / "infra" / "profiles" / f"{name}.yaml"
    if not path.is_file():
        raise ParamsError(f"profile {name}: {path} not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict) or any(isinstance(v, dict | list) for v in raw.values()):
        raise ParamsError(f"{path}: a profile is a flat mapping of dotted keys to values")
    out = []
    for key, value in raw.items():
        text = "null" if value is None else yaml.safe_dump(value, default_flow_style=True)
        text = text.strip().removesuffix("...").strip()
        if any(c.isspace() for c in text):
            raise ParamsError(f"{path}: {key}: a value with spaces cannot be passed as -S")
        out.append(f"{key}={text}")
    return out


def _opt(flag: str, dest: str | None = None, required: bool = True, **kwargs) -> tuple:
    """One option: ``--flag`` fills the stage function's keyword ``dest`` (default: flag)."""
    name = flag.lstrip("-")
    return flag, dest or name, {"required": required, "metavar": name.upper(), **kwargs}


#: command -> (module whose ``main(params, **options)`` runs it, help, options). pretrain and
#: oracle share ``pipelines.train`` and pass their own name as ``phase``.
COMMANDS: dict[str, tuple[str, str, list[tuple]]] = {
    "prepare": (
        "prepare",
        "generate the embedded cross-domain benchmark",
        [_opt("--out"), _opt("--metrics", required=False)],
    ),
    **{
        phase: (
            "train",
            what,
            [_opt("--data"), _opt("--out"), _opt("--metrics"), _opt("--plots")],
        )
        for phase, what in (
            ("pretrain", "source-only training (SDA stage 1)"),
            ("oracle", "target-supervised upper bound"),
        )
    },
    "semantics": (
        "semantics",
        "SDA content-aware semantic modeling (CSM)",
        [
            _opt("--data"),
            _opt("--model", help="the stage-1 model folder"),
            _opt("--out"),
            _opt("--metrics"),
        ],
    ),
    "init": (
        "semantic_init",
        "SDA stage 2: L_seg + L_si from the stage-1 model",
        [
            _opt("--data"),
            _opt("--base", help="the stage-1 model folder"),
            _opt("--semantics"),
            _opt("--out"),
            _opt("--metrics"),
            _opt("--plots"),
        ],
    ),
    "masks": (
        "masks",
        "SDA semantic-based target masks (classifier + CAM)",
        [
            _opt("--data"),
            _opt("--base", help="the stage-1 model (encoder initialisation)"),
            _opt("--semantics"),
            _opt("--out"),
            _opt("--metrics"),
        ],
    ),
    "adapt": (
        "adapt",
        "stage 3: adapt to the target (adapt.method)",
        [
            _opt("--data"),
            _opt("--init", help="the model to adapt (SDA: stage 2; others: stage 1)"),
            _opt("--semantics", required=False, help="CSM labels (methods that need them)"),
            _opt("--masks", required=False, help="semantic-based masks (methods that need them)"),
            _opt("--out"),
            _opt("--metrics"),
            _opt("--plots"),
            _opt(
                "--figures",
                "figures_dir",
                required=False,
                help="folder for the t-SNE and reciprocal-mask figures",
            ),
        ],
    ),
    "tune": (
        "tune",
        "Ray Tune sweep over SDA temperatures and thresholds",
        [
            _opt("--data"),
            _opt("--base", help="the stage-1 model folder (for CSM)"),
            _opt("--init", help="the stage-2 model folder"),
            _opt("--semantics", "sem_dir"),
            _opt("--masks"),
            _opt("--out", help="folder: best_params.yaml, trials.parquet"),
            _opt("--plots", help="folder: sensitivity plots"),
            _opt("--metrics"),
        ],
    ),
    "compare": (
        "compare",
        "every method x task x seed of params.yaml: compare, with tables",
        [
            _opt("--work", help="folder of the units' models, data, logs (reused)"),
            _opt("--out", help="folder: results.md / .csv, per_class.csv, comparison.png"),
            _opt("--metrics", help="JSON: task -> model -> headline metric and gap closed"),
        ],
    ),
    "evaluate": (
        "evaluate",
        "evaluate trained models on source val / target test",
        [
            _opt("--data"),
            _opt("--models", nargs="+", help="model folders; name = folder name"),
            _opt("--metrics", help="eval.json: model -> split -> metric"),
            _opt("--predictions"),
            _opt("--overlays"),
        ],
    ),
    "report": (
        "report",
        "markdown + CSV table of all evaluated models",
        [
            _opt("--eval", "eval_path", required=False),
            _opt("--out"),
            _opt(
                "--from-mlflow",
                "from_mlflow",
                required=False,
                help="rebuild a comparison's tables from MLflow: its adaseg.compare id",
            ),
            _opt(
                "--experiments",
                required=False,
                help="`dvc exp show --json` output: add ablations.md",
            ),
        ],
    ),
}


def _dests(command: str) -> list[str]:
    """The stage-function keywords ``command``'s options fill (none for ``validate``)."""
    return [dest for _, dest, _ in COMMANDS[command][2]] if command in COMMANDS else []


def _paths(value) -> list:
    return [] if value is None else value if isinstance(value, list) else [value]


def _resource_error(err: Exception, params) -> str | None:
    """The message for an error of the services a stage runs on (only modules the stage
    loaded are asked), or None."""
    tracking = sys.modules.get("components.tracking")
    if tracking is not None and isinstance(err, tracking.TrackingUnavailable):
        return str(err)
    runtime = sys.modules.get("components.runtime")
    return runtime.object_store_advice(err, params.runtime) if runtime else None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging()
    params = None
    try:
        if args.command == "profile":
            # -S given here wins over the profile's value of the same key (one value a key)
            merged = {}
            for item in [*profile_overrides(args.name), *args.set]:
                key, sep, value = item.partition("=")
                if not sep:
                    raise ParamsError(f"-S {item!r}: expected key=value")
                merged[key] = value
            overrides = [f"{k}={v}" for k, v in merged.items()]
            read_params(args.params, overrides)  # the overlay must validate on this params file
            # "++": DVC's (Hydra) grammar for "set, adding the key where params.yaml lacks it"
            quote = (lambda x: x) if args.args else shlex.quote  # $(...) does not unquote
            flags = " ".join(f"-S {quote('++' + o)}" for o in overrides)
            print(flags if args.args else f"dvc exp run {flags}")
            return 0
        params = read_params(args.params, args.set)
        if args.command == "validate":
            print(f"{args.params}: ok")
            return 0
        module_name = COMMANDS[args.command][0]
        kwargs = {dest: getattr(args, dest) for dest in _dests(args.command)}
        if module_name == "train":
            kwargs["phase"] = args.command
        # Stage modules import torch / Ray / MLflow: only the one that runs is loaded.
        module = importlib.import_module(f"pipelines.{module_name}")
        module.main(params, **kwargs)
    except (ParamsError, DataError) as err:
        print(f"adaseg {args.command}: error: {err}", file=sys.stderr)
        return 2
    except FileNotFoundError as err:
        given = [str(v) for dest in _dests(args.command) for v in _paths(getattr(args, dest))]
        if not any(str(err.filename or "").startswith(g) for g in given):
            raise  # not one of the paths on the command line: a bug, keep the traceback
        print(f"adaseg {args.command}: error: no such file: {err.filename}", file=sys.stderr)
        return 2
    except Exception as err:
        # a lost tracking server, a full object store: say what is kept and what to do
        message = _resource_error(err, params) if params is not None else None
        if message is None:
            raise
        print(f"adaseg {args.command}: error: {message}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
