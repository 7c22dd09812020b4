"""The ``adaseg`` console entry point: one sub-command per stage, plus tools.

Every sub-command reads ``--params`` (default ``params.yaml``), applies ``-S key=value``
overrides, validates everything before doing any work, and takes its paths from argv (the
paths live in ``dvc.yaml`` only).
"""

from __future__ import annotations

import argparse
import logging
import sys

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

    s = sub.add_parser("prepare", help="generate the embedded cross-domain benchmark")
    s.add_argument("--out", required=True)
    s.add_argument("--metrics")

    for phase, what in (
        ("pretrain", "source-only training (SDA stage 1)"),
        ("oracle", "target-supervised upper bound"),
    ):
        s = sub.add_parser(phase, help=what)
        s.add_argument("--data", required=True)
        s.add_argument("--out", required=True)
        s.add_argument("--metrics", required=True)
        s.add_argument("--plots", required=True)

    s = sub.add_parser("semantics", help="SDA content-aware semantic modeling (CSM)")
    s.add_argument("--data", required=True)
    s.add_argument("--model", required=True, help="the stage-1 model folder")
    s.add_argument("--out", required=True)
    s.add_argument("--metrics", required=True)

    s = sub.add_parser("init", help="SDA stage 2: L_seg + L_si from the stage-1 model")
    s.add_argument("--data", required=True)
    s.add_argument("--base", required=True, help="the stage-1 model folder")
    s.add_argument("--semantics", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--metrics", required=True)
    s.add_argument("--plots", required=True)

    s = sub.add_parser("masks", help="SDA semantic-based target masks (classifier + CAM)")
    s.add_argument("--data", required=True)
    s.add_argument("--base", required=True, help="the stage-1 model (encoder initialisation)")
    s.add_argument("--semantics", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--metrics", required=True)

    s = sub.add_parser("adapt", help="stage 3: adapt to the target (adapt.method)")
    s.add_argument("--data", required=True)
    s.add_argument("--init", required=True, help="the stage-2 model folder")
    s.add_argument("--semantics", required=True)
    s.add_argument("--masks", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--metrics", required=True)
    s.add_argument("--plots", required=True)
    s.add_argument("--figures", help="folder for the t-SNE and reciprocal-mask figures")

    s = sub.add_parser("tune", help="Ray Tune sweep over SDA temperatures and thresholds")
    s.add_argument("--data", required=True)
    s.add_argument("--base", required=True, help="the stage-1 model folder (for CSM)")
    s.add_argument("--init", required=True, help="the stage-2 model folder")
    s.add_argument("--semantics", required=True)
    s.add_argument("--masks", required=True)
    s.add_argument("--out", required=True, help="folder: best_params.yaml, trials.parquet")
    s.add_argument("--plots", required=True, help="folder: sensitivity plots")
    s.add_argument("--metrics", required=True)

    s = sub.add_parser("evaluate", help="evaluate trained models on source val / target test")
    s.add_argument("--data", required=True)
    s.add_argument("--models", nargs="+", required=True, help="model folders; name = folder name")
    s.add_argument("--metrics", required=True, help="eval.json: model -> split -> metric")
    s.add_argument("--predictions", required=True)
    s.add_argument("--overlays", required=True)

    s = sub.add_parser("report", help="markdown + CSV table of all evaluated models")
    s.add_argument("--eval", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--experiments", help="`dvc exp show --json` output: add ablations.md")

    sub.add_parser("validate", help="validate the params file and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging()
    try:
        params = read_params(args.params, args.set)
        if args.command == "validate":
            print(f"{args.params}: ok")
        elif args.command == "prepare":
            from pipelines import prepare

            prepare.main(params, args.out, args.metrics)
        elif args.command in ("pretrain", "oracle"):
            from pipelines import train

            train.main(params, args.command, args.data, args.out, args.metrics, args.plots)
        elif args.command == "semantics":
            from pipelines import semantics

            semantics.main(params, args.data, args.model, args.out, args.metrics)
        elif args.command == "init":
            from pipelines import semantic_init

            semantic_init.main(
                params, args.data, args.base, args.semantics, args.out, args.metrics, args.plots
            )
        elif args.command == "masks":
            from pipelines import masks

            masks.main(params, args.data, args.base, args.semantics, args.out, args.metrics)
        elif args.command == "adapt":
            from pipelines import adapt

            adapt.main(
                params,
                args.data,
                args.init,
                args.semantics,
                args.masks,
                args.out,
                args.metrics,
                args.plots,
                args.figures,
            )
        elif args.command == "tune":
            from pipelines import tune

            tune.main(
                params,
                args.data,
                args.base,
                args.init,
                args.semantics,
                args.masks,
                args.out,
                args.plots,
                args.metrics,
            )
        elif args.command == "evaluate":
            from pipelines import evaluate

            evaluate.main(
                params, args.data, args.models, args.metrics, args.predictions, args.overlays
            )
        elif args.command == "report":
            from pipelines import report

            report.main(params, args.eval, args.out, args.experiments)
    except (ParamsError, DataError) as err:
        print(f"adaseg {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
