"""End to end: the methods comparison (``dvc repro compare/dvc.yaml:compare``) on tiny params,
2 methods (DACS, CDANet) x 2 tasks x 1 seed, in the shared tiny repository; its MLflow runs
and tags, the tables rebuilt from MLflow alone, and reuse of finished units."""

from __future__ import annotations

import json

import mlflow
import pandas as pd
import pytest

from tests.conftest import run_in

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def compared(repo):
    out = run_in(repo, "dvc", "repro", "compare/dvc.yaml:compare", timeout=1800)
    return repo, out.stdout + out.stderr


def _runs(repo, compare_id: str) -> pd.DataFrame:
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlruns.db'}")
    exp = mlflow.get_experiment_by_name("adaseg")
    return mlflow.search_runs(
        [exp.experiment_id], filter_string=f"tags.`adaseg.compare` = '{compare_id}'"
    )


def test_comparison_tables(compared):
    repo, _ = compared
    report = repo / "compare/report"
    md = (report / "results.md").read_text()
    assert "## referring" in md and "## semantic" in md and "per-class IoU" in md
    table = pd.read_csv(report / "results.csv")
    for task in ("referring", "semantic"):
        rows = table[table.task == task]
        # floor first, ceiling last, the methods in between
        assert rows.model.tolist() == ["source_only", "cdanet", "dacs", "oracle"]
        assert (rows.seeds == 1).all()
    per_class = pd.read_csv(report / "per_class.csv")
    assert {"background", "circle", "triangle", "miou"} <= set(per_class.columns)
    assert (report / "comparison.png").stat().st_size > 0
    plots = json.loads(run_in(repo, "dvc", "plots", "show", "--json").stdout)["data"]
    assert plots["compare/report/comparison.png"][0]["type"] == "image"  # a DVC plot too
    metrics = json.loads((repo / "metrics/compare.json").read_text())
    assert set(metrics) == {"referring", "semantic"}
    assert metrics["referring"]["source_only"]["gap_closed"] == 0.0
    eval_json = json.loads((repo / "compare/work/seed0/semantic/eval.json").read_text())
    assert set(eval_json) == {"source_only", "dacs", "cdanet", "oracle"}
    assert "iou/background" in eval_json["dacs"]["target_test"]


def test_every_run_is_tagged_and_the_table_rebuilds_from_mlflow(compared, tmp_path):
    repo, _ = compared
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlruns.db'}")
    runs = mlflow.search_runs(
        [mlflow.get_experiment_by_name("adaseg").experiment_id],
        filter_string="tags.`adaseg.stage` = 'compare'",
    )
    compare_id = runs.iloc[0]["tags.adaseg.compare"]
    mine = _runs(repo, compare_id)
    adapt = mine[mine["tags.adaseg.stage"] == "adapt"]
    assert sorted(zip(adapt["tags.adaseg.method"], adapt["tags.adaseg.task"], strict=True)) == [
        ("cdanet", "referring"),
        ("cdanet", "semantic"),
        ("dacs", "referring"),
        ("dacs", "semantic"),
    ]
    assert set(adapt["tags.adaseg.seed"]) == {"0"}
    # every unit's run says its seed, and (but the seed's prepare) its task
    units = mine[mine["tags.adaseg.stage"] != "compare"]
    assert (units["tags.adaseg.seed"] == "0").all()
    tasked = units[units["tags.adaseg.stage"] != "prepare"]
    assert tasked["tags.adaseg.task"].notna().all()
    assert set(tasked["tags.adaseg.task"]) == {"referring", "semantic"}
    assert (mine["status"] == "FINISHED").all()
    run_in(repo, "adaseg", "report", "--from-mlflow", compare_id, "--out", str(tmp_path / "r"))
    again = pd.read_csv(tmp_path / "r/results.csv")
    first = pd.read_csv(repo / "compare/report/results.csv")
    cols = ["task", "model", "oiou_mean", "miou_mean", "gap_closed_mean"]
    pd.testing.assert_frame_equal(
        again[cols].sort_values(["task", "model"]).reset_index(drop=True),
        first[cols].sort_values(["task", "model"]).reset_index(drop=True),
    )


def test_finished_units_are_reused(compared):
    repo, _ = compared
    proc = run_in(
        repo,
        "adaseg",
        "compare",
        "--work",
        "compare/work",
        "--out",
        "compare/report",
        "--metrics",
        "metrics/compare.json",
    )
    log = proc.stdout + proc.stderr
    assert "compare: running" not in log
    assert log.count("up to date") == 11  # prepare, 2 x (pretrain, oracle, 2 adapt, evaluate)
    # every finished unit recorded when and how long it ran (the scaling benchmark reads it)
    stamps = [json.loads(p.read_text()) for p in (repo / "compare/work/.stamps").glob("*.json")]
    assert len(stamps) == 11 and all(s["seconds"] > 0 and s["start"] > 0 for s in stamps)


def test_unknown_method_is_refused_before_any_unit(compared):
    repo, _ = compared
    proc = run_in(
        repo,
        "adaseg",
        "-S",
        "compare.methods=[dacs, nope]",
        "compare",
        "--work",
        "never",
        "--out",
        "never2",
        "--metrics",
        "never.json",
        check=False,
    )
    assert proc.returncode == 2 and "compare.methods" in proc.stderr
    assert not (repo / "never").exists()
