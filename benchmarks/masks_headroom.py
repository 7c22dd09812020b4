"""Headroom of the semantic-based target masks: SDA's stage 3 re-run with the held-back target
ground truth in place of the `masks` stage's output, everything else unchanged.

    python benchmarks/masks_headroom.py --repos /tmp/repos/seed0 /tmp/repos/seed1
    python benchmarks/masks_headroom.py --merge a.json b.json   # join runs made separately

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


def run_one(repo: Path) -> dict:
    params = load_params(repo / "params.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        ground_truth_masks(repo, params, t / "masks")
        env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{t / 'mlruns.db'}")
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
        env.pop("RAY_ADDRESS", None)
        adapt = ["adaseg", "adapt", "--data", DATA, "--init", "models/init"]
        adapt += ["--semantics", "semantics", "--masks", str(t / "masks"), "--out", str(t / "sda")]
        adapt += ["--metrics", str(t / "adapt.json"), "--plots", str(t / "adapt.csv")]
        adapt += ["--figures", str(t / "figures")]
        evaluate = ["adaseg", "evaluate", "--data", DATA, "--models", str(t / "sda")]
        evaluate += ["--metrics", str(t / "eval.json"), "--predictions", str(t / "pred")]
        evaluate += ["--overlays", str(t / "overlays")]
        for cmd in (adapt, evaluate):
            subprocess.run(cmd, cwd=repo, env=env, check=True)
        headroom = json.loads((t / "eval.json").read_text())["sda"][SPLIT]
        curve = pd.read_csv(t / "adapt.csv")["val_oiou"].round(4).tolist()
    evals = json.loads((repo / "metrics/eval.json").read_text())
    masks = json.loads((repo / "metrics/masks.json").read_text())
    lo, hi = evals["source_only"][SPLIT]["oiou"], evals["oracle"][SPLIT]["oiou"]
    base = evals["sda"][SPLIT]
    return {
        "seed": params.seed,
        "pipeline_masks_oiou_vs_gt": masks["oiou_vs_gt"],
        "sda": {k: base[k] for k in METRICS},
        "sda_gt_masks": {k: headroom[k] for k in METRICS},
        "gt_masks_val_oiou_per_epoch": curve,
        "gap_closed": (base["oiou"] - lo) / (hi - lo),
        "gap_closed_gt_masks": (headroom["oiou"] - lo) / (hi - lo),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repos", nargs="*", type=Path, default=[])
    ap.add_argument(
        "--merge", nargs="*", type=Path, default=[], help="earlier outputs whose runs join these"
    )
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/masks_headroom.json")
    args = ap.parse_args()
    runs = [r for f in args.merge for r in json.loads(f.read_text())["runs"]]
    runs += [run_one(r.resolve()) for r in args.repos]
    if not runs:
        ap.error("nothing to measure: give --repos and/or --merge")
    runs.sort(key=lambda r: r["seed"])

    def ms(xs: list[float]) -> dict:
        mean, std = mean_std(xs)
        return {"mean": mean, "std": std}

    summary = {
        f"{model}/{k}": ms([r[model][k] for r in runs])
        for model in ("sda", "sda_gt_masks")
        for k in METRICS
    }
    summary["d_oiou"] = ms([r["sda_gt_masks"]["oiou"] - r["sda"]["oiou"] for r in runs])
    summary["gap_closed"] = ms([r["gap_closed"] for r in runs])
    summary["gap_closed_gt_masks"] = ms([r["gap_closed_gt_masks"] for r in runs])
    args.out.write_text(json.dumps({"split": SPLIT, "runs": runs, "summary": summary}, indent=2))
    print("| masks | oIoU | mIoU | mAP | gap closed |\n|---|---|---|---|---|")
    for model, gap in (("sda", "gap_closed"), ("sda_gt_masks", "gap_closed_gt_masks")):
        cells = [
            f"{summary[f'{model}/{k}']['mean']:.3f} ± {summary[f'{model}/{k}']['std']:.3f}"
            for k in METRICS
        ]
        g = summary[gap]
        print(f"| {model} | {' | '.join(cells)} | {g['mean']:.0%} ± {g['std']:.0%} |")


if __name__ == "__main__":
    main()
