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

from components.comparison import Record, write_report
from components.config import Params, ParamsError
from components.io import atomic_path
from components.tracking import stage_run, tracking_uri
from pipelines.common import repo_root

METRICS = ["oiou", "miou", "map", "prec@0.5", "prec@0.7", "prec@0.9", "zero_acc", "pixel_acc"]
#: DMMI's layout of referring results by query type (components.metrics.query_type_metrics)
BY_TYPE = ["one/oiou", "many/oiou", "targets/oiou", "zero/acc"]


def headline(results: dict) -> str:
    """The metric the gap is measured on: oIoU (referring) or mIoU (semantic)."""
    some = next((v for per in results.values() for v in per.values()), {})
    return "oiou" if "oiou" in some else "miou"


def table(results: dict) -> pd.DataFrame:
    classes = sorted(
        {k for per in results.values() for v in per.values() for k in v if k.startswith("iou/")}
    )
    rows = [
        {"model": model, "split": split, **{m: vals.get(m) for m in METRICS + BY_TYPE + classes}}
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


def experiment_runs(exp_show: list, split: str = "target_test") -> list[dict]:
    """One record per distinct experiment of ``dvc exp show --json`` (parsed), the first
    (baseline) first: ``experiment``, ``changes`` (the params that differ from the baseline's,
    ``runtime.*`` aside) and every model's metrics on ``split`` (``eval``). Experiments with
    the same params as one listed earlier are the same run and are left out."""
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
        out.append(
            {
                "experiment": name,
                "changes": ", ".join(f"{k}={v}" for k, v in sorted(diff.items())) or "(baseline)",
                "eval": {
                    m: e[split] for m, e in evals.items() if isinstance(e, dict) and split in e
                },
            }
        )
    return out


def ablation_table(exp_show: list, model: str = "sda", split: str = "target_test") -> pd.DataFrame:
    """One row per experiment (:func:`experiment_runs`): its changes and ``model``'s metrics
    on ``split``. Input: the parsed output of ``dvc exp show --json``."""
    return pd.DataFrame(
        [
            {
                "experiment": run["experiment"],
                "changes": run["changes"],
                **{m: run["eval"].get(model, {}).get(m) for m in ("oiou", "miou", "map")},
            }
            for run in experiment_runs(exp_show, split)
        ]
    )


def records_from_mlflow(params: Params, compare_id: str) -> list[Record]:
    """A comparison's records from MLflow alone: its ``evaluate`` runs (tags
    ``adaseg.compare``, ``adaseg.task``, ``adaseg.seed``) and their
    ``<model>.target_test.<metric>`` metrics."""
    mlflow.set_tracking_uri(tracking_uri(params.runtime, repo_root()))
    exp = mlflow.get_experiment_by_name(params.runtime.mlflow_experiment)
    if exp is None:
        raise ParamsError(f"--from-mlflow: no MLflow experiment {params.runtime.mlflow_experiment}")
    runs = mlflow.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`adaseg.compare` = '{compare_id}' and tags.`adaseg.stage` = 'evaluate'"
        " and attributes.status = 'FINISHED'",
        output_format="list",
    )
    if not runs:
        raise ParamsError(f"--from-mlflow: no finished evaluate run of comparison {compare_id!r}")
    latest = {}  # a unit re-run after a change: its newest evaluate run counts
    for run in sorted(runs, key=lambda r: r.info.start_time):
        tags = run.data.tags
        task = tags.get("adaseg.task") or tags["adaseg.compare_task"]  # the older runs' key
        latest[(task, tags["adaseg.seed"])] = run
    records = []
    for (task, seed), run in latest.items():
        seed = int(seed)
        per_model: dict[str, dict[str, float]] = {}
        for key, value in run.data.metrics.items():
            model, sep, metric = key.partition(".target_test.")
            if not sep:
                continue
            # evaluate logs "@" as "_at_" and "iou/<class>" as "iou.<class>"
            if metric.startswith("iou."):
                metric = "iou/" + metric[4:]
            metric = metric.replace("_at_", "@")
            per_model.setdefault(model, {})[metric] = value
        records += [Record(task, seed, m, v) for m, v in per_model.items()]
    return records


def main(
    params: Params,
    out: str,
    eval_path: str | None = None,
    experiments: str | None = None,
    from_mlflow: str | None = None,
) -> None:
    if from_mlflow:
        records = records_from_mlflow(params, from_mlflow)
        with atomic_path(out, is_dir=True) as tmp:
            write_report(records, tmp)
        return
    if not eval_path:
        raise ParamsError("report: give --eval (an eval.json) or --from-mlflow (a comparison id)")
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
