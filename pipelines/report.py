"""Stage ``report``: one markdown and one CSV table of every evaluated model and split.

On the target test split it also shows the share of the source-only -> oracle gap each model
closes (0 = source-only, 1 = oracle): oIoU for the referring task, mIoU for the semantic task,
whose per-class IoUs (``iou/<class>``) follow as columns.
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

METRICS = ["oiou", "miou", "map", "prec@0.5", "prec@0.7", "prec@0.9", "zero_acc", "pixel_acc"]


def headline(results: dict) -> str:
    """The metric the gap is measured on: oIoU (referring) or mIoU (semantic)."""
    some = next((v for per in results.values() for v in per.values()), {})
    return "oiou" if "oiou" in some else "miou"


def table(results: dict) -> pd.DataFrame:
    classes = sorted({k for per in results.values() for v in per.values() for k in v if "/" in k})
    rows = [
        {"model": model, "split": split, **{m: vals.get(m) for m in METRICS + classes}}
        for model, per_split in results.items()
        for split, vals in per_split.items()
    ]
    df = pd.DataFrame(rows)
    df = df[[c for c in df.columns if c in ("model", "split") or df[c].notna().any()]]
    key = headline(results)
    try:
        lo = results["source_only"]["target_test"][key]
        hi = results["oracle"]["target_test"][key]
    except KeyError:
        return df
    if hi != lo:
        closed = (df[key] - lo) / (hi - lo)
        df[f"gap_closed_{key}"] = closed.where(df["split"] == "target_test")
    return df


def to_markdown(df: pd.DataFrame) -> str:
    def cell(v) -> str:
        if v is None or (isinstance(v, float) and pd.isna(v)):
            return ""
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _exp_rows(node, rows: list) -> None:
    """Collect (name, params, eval) from the nested JSON of ``dvc exp show --json``."""
    if isinstance(node, list):
        for item in node:
            _exp_rows(item, rows)
        return
    if not isinstance(node, dict):
        return
    data = node.get("data") or {}
    params = (data.get("params") or {}).get("params.yaml", {}).get("data")
    evals = (data.get("metrics") or {}).get("metrics/eval.json", {}).get("data")
    if params and evals:
        rev = str(node.get("rev", ""))
        rows.append((node.get("name") or (rev if rev == "workspace" else rev[:7]), params, evals))
    for key in ("experiments", "revs"):
        _exp_rows(node.get(key), rows)


def ablation_table(exp_show: list, model: str = "sda", split: str = "target_test") -> pd.DataFrame:
    """One row per experiment: the params that differ from the first (baseline) row and
    ``model``'s metrics on ``split``. Input: the parsed output of ``dvc exp show --json``."""
    rows: list = []
    _exp_rows(exp_show, rows)
    if not rows:
        raise ValueError("no experiment with params.yaml and metrics/eval.json found")
    base = _flatten(rows[0][1])
    out = []
    seen = set()
    for name, params, evals in rows:
        flat = _flatten(params)
        diff = {k: v for k, v in flat.items() if base.get(k) != v and not k.startswith("runtime.")}
        key = json.dumps(diff, sort_keys=True, default=str)  # same params, same run
        if key in seen:
            continue
        seen.add(key)
        vals = evals.get(model, {}).get(split, {})
        out.append(
            {
                "experiment": name,
                "changes": ", ".join(f"{k}={v}" for k, v in sorted(diff.items())) or "(baseline)",
                **{m: vals.get(m) for m in ("oiou", "miou", "map")},
            }
        )
    return pd.DataFrame(out)


def main(params: Params, eval_path: str, out: str, experiments: str | None = None) -> None:
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
            if experiments:
                abl = ablation_table(json.loads(Path(experiments).read_text()))
                abl.to_csv(tmp / "ablations.csv", index=False)
                (tmp / "ablations.md").write_text(
                    "# Ablations\n\nSDA on target test, one row per DVC experiment.\n\n"
                    + to_markdown(abl)
                    + "\n"
                )
        mlflow.log_artifacts(out, artifact_path="report")
