"""Headroom of the semantic-based target masks: SDA's stage 3 re-run with the held-back target
ground truth in place of the `masks` stage's output, everything else unchanged; and what other
settings of the `masks` stage buy (``--variants``).

    python benchmarks/masks_headroom.py --repos /tmp/repos/seed0 /tmp/repos/seed1
    python benchmarks/masks_headroom.py --merge a.json b.json   # join runs made separately
    python benchmarks/masks_headroom.py --repos /tmp/repos/seed0 --out v.json \
        --variants lse:masks.pooling=lse gap:masks.pooling=gap,masks.epochs=10

A variant ``NAME:field=value[,field=value]`` re-runs the `masks` stage with those params (with
this checkout's code) into the temporary folder, then `adapt` and `evaluate` on its masks; its
row holds the stage's own metrics (``masks``) next to SDA's. Every run here uses this
checkout's code on the repository's upstream outputs; ``sda`` is the repository's own run,
made with the code of its `dvc repro`.

Each repository must have run `dvc repro`. Per repository, the `masks` table is copied with
every mask replaced by the sample's ground-truth mask (same sample ids and categories), then
`adaseg adapt` and `adaseg evaluate` run on it into a temporary folder with their own MLflow
store: the repository's workspace, outputs and tracking store are left untouched. This is an
upper bound for diagnosis only; the pipeline itself never reads target labels for training.

Writes benchmarks/results/masks_headroom.json (per seed and mean ± sd) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from components.config import Params, load_params  # noqa: E402
from components.data.dataset import load_split  # noqa: E402
from components.data.schema import encode_rle  # noqa: E402
from components.data.vocab import Vocab  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from repro_seeds import mean_std  # noqa: E402

SPLIT = "target_test"
METRICS = ("oiou", "miou", "map")
DATA = "data/prepared"
CODE = ("components", "pipelines")
RUN_STATE = (".adaseg", "mlartifacts", "mlruns.db")
MASKS_METRICS = ("kept_fraction", "oiou_vs_gt", "val_map", "classifier_loss", "label_prior_loss")


def ground_truth_masks(repo: Path, params: Params, dst: Path) -> None:
    """``repo``'s semantic-mask table with each mask replaced by the ground truth."""
    vocab = Vocab.load(repo / DATA / "vocab.json")
    m = params.model
    target = load_split(repo / DATA, "target", "train", vocab, m.max_words, m.num_superpixels)
    truth = dict(zip(target.sample_ids, (encode_rle(x) for x in target.masks), strict=True))
    table = pd.read_parquet(repo / "masks/semantic_masks.parquet")
    table["mask_rle"] = [truth[s] for s in table["sample_id"]]
    dst.mkdir(parents=True)
    table.to_parquet(dst / "semantic_masks.parquet", index=False)


def shadow(repo: Path, dst: Path) -> Path:
    """A folder to run stages in that reads ``repo``'s files but this checkout's code.

    Local Ray workers put the driver's working directory first on their import path, so a
    stage run inside ``repo`` trains with the code ``repo`` was checked out with; here every
    top-level entry of ``repo`` is linked, except the code packages, linked from this checkout,
    and the run state (Ray Train checkpoints, MLflow artefacts), which starts empty so that
    nothing is written into ``repo``.
    """
    dst.mkdir(parents=True)
    for entry in repo.iterdir():
        if entry.name in RUN_STATE:
            continue
        src = ROOT / entry.name if entry.name in CODE else entry
        (dst / entry.name).symlink_to(src, target_is_directory=src.is_dir())
    return dst


def stage3(repo: Path, t: Path, overrides: list[str] | None = None) -> tuple[dict, list]:
    """`adapt` + `evaluate` on the masks in ``t / "masks"`` (made first by the `masks` stage
    with ``overrides`` when given), all into ``t``; returns target-test metrics and the
    per-epoch target-val oIoU."""
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{t / 'mlruns.db'}")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.pop("RAY_ADDRESS", None)
    work = shadow(repo, t / "work")
    cmds = []
    if overrides is not None:
        sets = [a for o in overrides for a in ("-S", o)]
        cmds.append(
            ["adaseg", *sets, "masks", "--data", DATA, "--base", "models/source_only"]
            + ["--semantics", "semantics", "--out", str(t / "masks")]
            + ["--metrics", str(t / "masks.json")]
        )
    adapt = ["adaseg", "adapt", "--data", DATA, "--init", "models/init"]
    adapt += ["--semantics", "semantics", "--masks", str(t / "masks"), "--out", str(t / "sda")]
    adapt += ["--metrics", str(t / "adapt.json"), "--plots", str(t / "adapt.csv")]
    adapt += ["--figures", str(t / "figures")]
    evaluate = ["adaseg", "evaluate", "--data", DATA, "--models", str(t / "sda")]
    evaluate += ["--metrics", str(t / "eval.json"), "--predictions", str(t / "pred")]
    evaluate += ["--overlays", str(t / "overlays")]
    for cmd in (*cmds, adapt, evaluate):
        subprocess.run(cmd, cwd=work, env=env, check=True)
    metrics = json.loads((t / "eval.json").read_text())["sda"][SPLIT]
    return metrics, pd.read_csv(t / "adapt.csv")["val_oiou"].round(4).tolist()


def run_one(repo: Path, variants: dict[str, list[str]], ground_truth: bool = True) -> dict:
    params = load_params(repo / "params.yaml")
    out = {"seed": params.seed}
    evals = json.loads((repo / "metrics/eval.json").read_text())
    masks = json.loads((repo / "metrics/masks.json").read_text())
    lo, hi = evals["source_only"][SPLIT]["oiou"], evals["oracle"][SPLIT]["oiou"]
    base = evals["sda"][SPLIT]
    out["pipeline_masks_oiou_vs_gt"] = masks["oiou_vs_gt"]
    out["sda"] = {k: base[k] for k in METRICS}
    out["gap_closed"] = (base["oiou"] - lo) / (hi - lo)
    if ground_truth:
        with tempfile.TemporaryDirectory() as tmp:
            t = Path(tmp)
            ground_truth_masks(repo, params, t / "masks")
            headroom, curve = stage3(repo, t)
        out["sda_gt_masks"] = {k: headroom[k] for k in METRICS}
        out["gt_masks_val_oiou_per_epoch"] = curve
        out["gap_closed_gt_masks"] = (headroom["oiou"] - lo) / (hi - lo)
    rows = {}
    for name, overrides in variants.items():
        with tempfile.TemporaryDirectory() as tmp:
            t = Path(tmp)
            metrics, _ = stage3(repo, t, overrides)
            rows[name] = {
                "overrides": overrides,
                "masks": json.loads((t / "masks.json").read_text()),
                **{k: metrics[k] for k in METRICS},
                "gap_closed": (metrics["oiou"] - lo) / (hi - lo),
            }
    return out | ({"variants": rows} if rows else {})


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``NAME:field=value[,field=value]`` -> (NAME, ["field=value", ...])."""
    name, sep, sets = text.partition(":")
    overrides = [o for o in sets.split(",") if o]
    if not sep or not name or not all("=" in o for o in overrides):
        raise argparse.ArgumentTypeError(f"--variants {text!r}: expected NAME:field=value[,...]")
    return name, overrides


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repos", nargs="*", type=Path, default=[])
    ap.add_argument(
        "--merge", nargs="*", type=Path, default=[], help="earlier outputs whose runs join these"
    )
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/masks_headroom.json")
    ap.add_argument(
        "--variants",
        nargs="*",
        type=parse_variant,
        default=[],
        help="NAME:field=value[,field=value]: the masks stage re-run with these params",
    )
    ap.add_argument(
        "--ground-truth",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also the run on ground-truth masks (--no-ground-truth: variants only)",
    )
    args = ap.parse_args()
    variants = dict(args.variants)
    runs = [r for f in args.merge for r in json.loads(f.read_text())["runs"]]
    runs += [run_one(r.resolve(), variants, args.ground_truth) for r in args.repos]
    if not runs:
        ap.error("nothing to measure: give --repos and/or --merge")
    runs.sort(key=lambda r: r["seed"])

    def ms(xs: list[float]) -> dict:
        mean, std = mean_std(xs)
        return {"mean": mean, "std": std}

    # rows: (name, per-run metrics dict or None, gap-closed key); only rows every run has
    rows = [("sda", lambda r: r["sda"] | {"gap_closed": r["gap_closed"]})]
    if all("sda_gt_masks" in r for r in runs):
        rows.append(
            ("sda_gt_masks", lambda r: r["sda_gt_masks"] | {"gap_closed": r["gap_closed_gt_masks"]})
        )
    names = set.intersection(*(set(r.get("variants", {})) for r in runs))
    rows += [(n, lambda r, n=n: r["variants"][n]) for n in sorted(names)]
    summary = {}
    for name, get in rows:
        for k in (*METRICS, "gap_closed"):
            summary[f"{name}/{k}"] = ms([get(r)[k] for r in runs])
        if name != "sda":
            summary[f"{name}/d_oiou"] = ms([get(r)["oiou"] - r["sda"]["oiou"] for r in runs])
        if name in names:  # the masks stage's own numbers (IoU vs ground truth: diagnostic)
            for k in MASKS_METRICS:
                summary[f"{name}/masks/{k}"] = ms([get(r)["masks"][k] for r in runs])
    args.out.write_text(json.dumps({"split": SPLIT, "runs": runs, "summary": summary}, indent=2))
    print("| masks | oIoU | mIoU | mAP | gap closed | Δ oIoU vs sda |\n|---|---|---|---|---|---|")
    for name, _ in rows:
        cells = [
            f"{summary[f'{name}/{k}']['mean']:.3f} ± {summary[f'{name}/{k}']['std']:.3f}"
            for k in METRICS
        ]
        g = summary[f"{name}/gap_closed"]
        d = summary.get(f"{name}/d_oiou")
        delta = f"{d['mean']:+.3f} ± {d['std']:.3f}" if d else "–"
        print(f"| {name} | {' | '.join(cells)} | {g['mean']:.0%} ± {g['std']:.0%} | {delta} |")
    if names:
        print(
            "\n| variant | "
            + " | ".join(MASKS_METRICS)
            + " |\n"
            + "|---" * (len(MASKS_METRICS) + 1)
            + "|"
        )
        for n in sorted(names):
            cells = [f"{summary[f'{n}/masks/{k}']['mean']:.3f}" for k in MASKS_METRICS]
            print(f"| {n} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
