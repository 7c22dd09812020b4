"""Stage ``report``: one markdown and one CSV table of every evaluated model and split.

The target-test columns also show, for every model between ``source_only`` and ``oracle``, the
share of the source-only -> oracle gap it closes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from components.io import atomic_path

METRICS = ["oiou", "miou", "map", "prec@0.5", "prec@0.7", "prec@0.9", "zero_acc"]


def table(results: dict) -> pd.DataFrame:
    rows = []
    for model, per_split in results.items():
        for split, vals in per_split.items():
            rows.append({"model": model, "split": split, **{m: vals.get(m) for m in METRICS}})
    df = pd.DataFrame(rows)
    if {"source_only", "oracle"} <= set(df["model"]):
        base = df[(df.model == "source_only") & (df.split == "target_test")]
        top = df[(df.model == "oracle") & (df.split == "target_test")]
        if len(base) and len(top):
            lo, hi = base["oiou"].iloc[0], top["oiou"].iloc[0]
            closed = (df["oiou"] - lo) / (hi - lo) if hi != lo else None
            df["gap_closed_oiou"] = (
                closed.where(df.split == "target_test") if closed is not None else None
            )
    return df


def to_markdown(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, row in df.iterrows():
        cells = [
            f"{v:.3f}" if isinstance(v, float) and pd.notna(v) else ("" if pd.isna(v) else str(v))
            for v in row
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(eval_path: str, out: str) -> None:
    results = json.loads(Path(eval_path).read_text())
    df = table(results)
    with atomic_path(out, is_dir=True) as tmp:
        df.to_csv(tmp / "results.csv", index=False)
        (tmp / "results.md").write_text(
            "# Results\n\nModels evaluated by `dvc repro` (from `metrics/eval.json`).\n\n"
            + to_markdown(df)
            + "\n"
        )
