"""Stage ``report``: one markdown and one CSV table of every evaluated model and split.

On the target test split it also shows the share of the source-only -> oracle oIoU gap each
model closes (0 = source-only, 1 = oracle).
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pandas as pd

from components.config import Params
from components.io import atomic_path
from components.tracking import stage_run
from pipelines.common import repo_root

METRICS = ["oiou", "miou", "map", "prec@0.5", "prec@0.7", "prec@0.9", "zero_acc"]


def table(results: dict) -> pd.DataFrame:
    rows = [
        {"model": model, "split": split, **{m: vals.get(m) for m in METRICS}}
        for model, per_split in results.items()
        for split, vals in per_split.items()
    ]
    df = pd.DataFrame(rows)
    try:
        lo = results["source_only"]["target_test"]["oiou"]
        hi = results["oracle"]["target_test"]["oiou"]
    except KeyError:
        return df
    if hi != lo:
        closed = (df["oiou"] - lo) / (hi - lo)
        df["gap_closed_oiou"] = closed.where(df["split"] == "target_test")
    return df


def to_markdown(df: pd.DataFrame) -> str:
    def cell(v) -> str:
        if v is None or (isinstance(v, float) and pd.isna(v)):
            return ""
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def main(params: Params, eval_path: str, out: str) -> None:
    results = json.loads(Path(eval_path).read_text())
    df = table(results)
    with stage_run("report", params.runtime, {}, repo_root()):
        with atomic_path(out, is_dir=True) as tmp:
            df.to_csv(tmp / "results.csv", index=False)
            (tmp / "results.md").write_text(
                "# Results\n\nEvery model on every evaluated split (`metrics/eval.json`).\n\n"
                + to_markdown(df)
                + "\n"
            )
        mlflow.log_artifacts(out, artifact_path="report")
