"""The methods-comparison tables: methods x metrics on the target test split, mean ± sd over
seeds, the source-only floor and the oracle ceiling, the share of the gap each method closes,
and per-class IoU for the semantic task (the papers' Table 1 layout).

Built from plain records (one per evaluated model, task and seed), so the same tables come
from the comparison's ``eval.json`` files or from MLflow alone (``adaseg report --from-mlflow``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

#: the headline metric of each task (the gap is measured on it) and the metrics shown
HEADLINE = {"referring": "oiou", "semantic": "miou"}
SHOWN = {
    "referring": ["oiou", "miou", "map", "prec@0.5", "zero_acc"],
    "semantic": ["miou", "pixel_acc"],
}
FLOOR, CEILING = "source_only", "oracle"


@dataclass(frozen=True)
class Record:
    task: str
    seed: int
    model: str  # source_only (stage 1), oracle, or a method name
    metrics: dict[str, float]  # target test


def records_from_eval(eval_json: dict, task: str, seed: int, split="target_test") -> list[Record]:
    """``metrics/eval.json`` (model -> split -> metric) of one task and seed as records."""
    return [Record(task, seed, m, per[split]) for m, per in eval_json.items() if split in per]


def _order(models: list[str]) -> list[str]:
    rest = sorted(m for m in models if m not in (FLOOR, CEILING))
    return [m for m in (FLOOR, *rest, CEILING) if m in models]


def _fmt(values: list[float], pct: bool = False) -> str:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if not len(v):
        return ""
    scale, unit = (100.0, " %") if pct else (1.0, "")
    if len(v) == 1:
        return f"{v[0] * scale:.{0 if pct else 3}f}{unit}"
    sd = v.std(ddof=1)
    return f"{v.mean() * scale:.{0 if pct else 3}f} ± {sd * scale:.{0 if pct else 3}f}{unit}"


def gap_closed(records: list[Record]) -> dict[tuple[str, str, int], float]:
    """(task, model, seed) -> share of that seed's floor -> ceiling gap on the headline."""
    by = {(r.task, r.model, r.seed): r.metrics for r in records}
    out = {}
    for (task, model, seed), m in by.items():
        key = HEADLINE[task]
        lo, hi = by.get((task, FLOOR, seed)), by.get((task, CEILING, seed))
        if lo is None or hi is None or hi[key] == lo[key]:
            continue
        out[(task, model, seed)] = (m[key] - lo[key]) / (hi[key] - lo[key])
    return out


def summary_table(records: list[Record], task: str) -> pd.DataFrame:
    """One row per model: each shown metric as mean ± sd over seeds, the gap closed, n seeds.
    Raw means / sds are in the ``<metric>_mean`` / ``<metric>_sd`` columns (for the CSV)."""
    recs = [r for r in records if r.task == task]
    closed = gap_closed(records)
    rows = []
    for model in _order(sorted({r.model for r in recs})):
        mine = sorted((r for r in recs if r.model == model), key=lambda r: r.seed)
        row: dict = {"model": model, "seeds": len(mine)}
        for key in SHOWN[task]:
            vals = [r.metrics.get(key, np.nan) for r in mine]
            row[key] = _fmt(vals)
            row[f"{key}_mean"] = float(np.nanmean(vals)) if mine else np.nan
            row[f"{key}_sd"] = float(np.nanstd(vals, ddof=1)) if len(mine) > 1 else np.nan
        gaps = [closed[(task, model, r.seed)] for r in mine if (task, model, r.seed) in closed]
        row["gap_closed"] = _fmt(gaps, pct=True)
        row["gap_closed_mean"] = float(np.mean(gaps)) if gaps else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def per_class_table(records: list[Record], task: str = "semantic") -> pd.DataFrame:
    """Per-class IoU (mean over seeds) of every model: the papers' Table 1 layout."""
    recs = [r for r in records if r.task == task]
    classes = sorted({k[4:] for r in recs for k in r.metrics if k.startswith("iou/")})
    rows = []
    for model in _order(sorted({r.model for r in recs})):
        mine = [r for r in recs if r.model == model]
        row = {"model": model}
        for c in classes:
            vals = [r.metrics[f"iou/{c}"] for r in mine if f"iou/{c}" in r.metrics]
            row[c] = float(np.mean(vals)) if vals else np.nan
        row["miou"] = float(np.mean([r.metrics["miou"] for r in mine]))
        rows.append(row)
    return pd.DataFrame(rows)


def markdown(df: pd.DataFrame, columns: list[str] | None = None) -> str:
    cols = columns or list(df.columns)

    def cell(v) -> str:
        if v is None or (isinstance(v, float) and np.isnan(v)):
            return ""
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(row[c]) for c in cols) + " |" for _, row in df.iterrows()]
    return "\n".join(lines)


def bar_chart(tables: dict[str, pd.DataFrame], path: Path) -> None:
    """Headline metric per model with error bars (sd over seeds), one panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tables), figsize=(5 * len(tables), 3.2), squeeze=False)
    for ax, (task, df) in zip(axes[0], tables.items(), strict=True):
        key = HEADLINE[task]
        err = df[f"{key}_sd"].fillna(0.0)
        ax.bar(df["model"], df[f"{key}_mean"], yerr=err, capsize=3, color="tab:blue")
        ax.set_title(f"{task}: target test {key}")
        ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(records: list[Record], out: Path) -> dict:
    """``results.md``, ``results.csv``, ``per_class.csv`` (semantic) and ``comparison.png``
    into ``out``; returns the DVC metrics (task -> model -> headline mean and gap closed)."""
    tasks = [t for t in HEADLINE if any(r.task == t for r in records)]
    if not tasks:
        raise ValueError("no evaluated model to compare (no records of a known task)")
    tables = {t: summary_table(records, t) for t in tasks}
    md, frames, metrics = ["# Methods on the target test split", ""], [], {}
    for task, df in tables.items():
        shown = ["model", "seeds", *SHOWN[task], "gap_closed"]
        md += [f"## {task} (gap closed on {HEADLINE[task]})", "", markdown(df, shown), ""]
        frames.append(df.assign(task=task))
        key = HEADLINE[task]
        metrics[task] = {
            row.model: {
                key: row[f"{key}_mean"],
                **({"gap_closed": row.gap_closed_mean} if np.isfinite(row.gap_closed_mean) else {}),
            }
            for _, row in df.iterrows()
        }
    if "semantic" in tables:
        pc = per_class_table(records)
        pc.to_csv(out / "per_class.csv", index=False)
        md += ["## semantic: per-class IoU (mean over seeds)", "", markdown(pc), ""]
    pd.concat(frames).to_csv(out / "results.csv", index=False)
    (out / "results.md").write_text("\n".join(md))
    bar_chart(tables, out / "comparison.png")
    return metrics
