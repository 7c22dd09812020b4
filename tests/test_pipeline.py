"""End to end: `dvc repro` of the real dvc.yaml on tiny params in a temporary copy of the repo.

Real DVC, real local Ray, real MLflow SQLite store. Checks every output, the data contract,
one MLflow run per stage grouped by pipeline id, no-op second repro, `dvc exp run -S`,
resume of a killed training stage, and that bad data fails cleanly without partial outputs.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time

import numpy as np
import pandas as pd
import pytest

from components.data.schema import decode_rle
from components.metrics import referring_metrics
from tests.conftest import (
    TINY_OVERRIDES,
    dvc_metrics,
    kill_group,
    mlflow_runs,
    repo_env,
    repro_log,
    start_killable,
)
from tests.conftest import run_in as _run

pytestmark = pytest.mark.slow
STAGES = [
    "prepare",
    "pretrain",
    "semantics",
    "init",
    "masks",
    "adapt",
    "oracle",
    "evaluate",
    "report",
]
MODELS = {"source_only", "sda", "oracle"}


def test_repro_writes_every_output(repo):
    for path in [
        "data/prepared/vocab.json",
        "data/prepared/stats.json",
        "models/source_only/model.pt",
        "models/oracle/model.pt",
        "models/init/model.pt",
        "models/sda/model.pt",
        "semantics/labels.parquet",
        "semantics/prototypes.npy",
        "masks/semantic_masks.parquet",
        "metrics/semantics.json",
        "metrics/masks.json",
        "metrics/adapt.json",
        "plots/adapt.csv",
        "metrics/pretrain.json",
        "metrics/oracle.json",
        "plots/pretrain.csv",
        "plots/overlays/source_only.png",
        "reports/results.md",
        "reports/results.csv",
    ]:
        assert (repo / path).is_file(), path
    assert len(list((repo / "data/prepared/source/train").glob("*.parquet"))) == 2  # 64 / 40
    history = pd.read_csv(repo / "plots/pretrain.csv")
    assert history["epoch"].tolist() == [1, 2]
    assert {"loss", "val_oiou", "val_miou", "val_map"} <= set(history.columns)
    report = (repo / "reports/results.md").read_text()
    assert all(m in report for m in MODELS)
    # nothing half-written left behind
    assert not list(repo.rglob(".*.tmp-*"))


def test_eval_contract_and_metrics_recomputable(repo):
    results = json.loads((repo / "metrics/eval.json").read_text())
    assert set(results) == MODELS
    for per_split in results.values():
        assert set(per_split) == {"source_val", "target_test"}
        for vals in per_split.values():
            assert {"oiou", "miou", "map", "prec@0.5", "n"} <= set(vals)
            assert 0.0 <= vals["oiou"] <= 1.0
    # predictions carry the prepared sample ids; metrics recompute from them
    preds = pd.read_parquet(repo / "predictions/source_only/target_test.parquet")
    truth = pd.read_parquet(repo / "data/prepared/target/test", columns=["sample_id", "target_rle"])
    merged = truth.merge(preds, on="sample_id", validate="one_to_one")
    assert len(merged) == len(truth) == 24

    def rle(r):
        return decode_rle({"size": list(r["size"]), "counts": r["counts"]})

    again = referring_metrics(
        [rle(r) for r in merged["pred_rle"]],
        [rle(r) for r in merged["target_rle"]],
        merged["score"].tolist(),
    )
    expected = results["source_only"]["target_test"]
    for key in ("oiou", "miou", "map"):
        assert again[key] == pytest.approx(expected[key], abs=1e-6)


def test_a_normal_repro_prints_one_line_per_epoch(repo):
    log = repro_log(repo).read_text()
    assert "Failed to query Ray Train Controller actor state" not in log
    assert "Traceback" not in log
    assert "Reporting training result" not in log  # Ray Train's INFO lines stay quiet
    # no notice repeated by every stage, no warning of our own code, no progress bar redrawn
    # into a log that cannot redraw, no Ray prefixes or colour codes around our lines
    for noise in (
        "Token authentication is enabled",
        "Creating initial MLflow database tables",
        "UserWarning",
        "pid=",
        "\x1b[",
        "\r",
    ):
        assert noise not in log, noise
    for phase in ("pretrain", "oracle", "init", "masks", "adapt"):
        n = TINY_OVERRIDES[phase]["epochs"]
        for epoch in range(1, n + 1):
            lines = re.findall(rf"^{phase} epoch {epoch}/{n}: .*val_seconds", log, re.MULTILINE)
            assert len(lines) == 1, (phase, epoch)


def test_one_mlflow_run_per_stage_grouped_and_tied_to_git(repo):
    # The shared repository also hosts other tests' invocations (the comparison, `dvc exp
    # run`): the fixture's `dvc repro` is the pipeline of the oldest run.
    runs = mlflow_runs(repo).sort_values("start_time")
    first = runs["tags.adaseg.pipeline_id"].iloc[0]
    runs = runs[runs["tags.adaseg.pipeline_id"] == first]
    # every stage of that one invocation shares its pipeline id, each exactly once
    assert sorted(runs["tags.adaseg.stage"]) == sorted(STAGES)
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True
    ).stdout.strip()
    assert set(runs["tags.mlflow.source.git.commit"]) == {commit}
    assert (runs["status"] == "FINISHED").all()
    pre = runs[runs["tags.adaseg.stage"] == "pretrain"].iloc[0]
    assert pre["params.pretrain.epochs"] == "2"
    import mlflow

    client = mlflow.tracking.MlflowClient()
    hist = client.get_metric_history(pre["run_id"], "val_oiou")
    assert [m.step for m in hist] == [1, 2]
    artifacts = {a.path for a in client.list_artifacts(pre["run_id"])}
    assert {"curves.png", "model"} <= artifacts
    ev = runs[runs["tags.adaseg.stage"] == "evaluate"].iloc[0]
    assert "overlays" in {a.path for a in client.list_artifacts(ev["run_id"])}
    # every training stage says where it trained: its local node, one attempt, its storage
    trained = runs[runs["tags.adaseg.stage"].isin(["pretrain", "oracle", "init", "masks", "adapt"])]
    assert len(trained) == 5
    assert trained["tags.adaseg.train_nodes"].str.fullmatch(r"[0-9a-f]{56}").all()
    assert (trained["tags.adaseg.train_restarts"] == "0").all()
    # amp: false (the default) trained in float32, whatever the CPU
    assert (trained["tags.adaseg.train_precision"] == "float32").all()
    storage = str(repo / ".adaseg/ray_results")
    assert trained["tags.adaseg.ray_storage"].str.startswith(storage).all()


def test_sda_stage_outputs(repo):
    sem = json.loads((repo / "metrics/semantics.json").read_text())
    assert sem["k_s"] >= 1 and sem["k_t"] + sem["k_u"] >= 1
    assert 0 <= sem["purity_source"] <= 1 and 0 <= sem["nmi_target"] <= 1
    labels = pd.read_parquet(repo / "semantics/labels.parquet")
    assert set(labels["domain"]) == {"source", "target"} and len(labels) == 128
    assert (labels.loc[labels.domain == "source", "category"] < sem["k_s"]).all()
    masks = pd.read_parquet(repo / "masks/semantic_masks.parquet")
    assert len(masks) == 64 and "oiou_vs_gt" in json.loads(
        (repo / "metrics/masks.json").read_text()
    )
    adapt = pd.read_csv(repo / "plots/adapt.csv")
    assert adapt["epoch"].tolist() == [1, 2]
    assert {"l_ct", "l_ho", "val_oiou"} <= set(adapt.columns)
    assert adapt["loss"].notna().all()


def test_second_repro_does_nothing(repo):
    before = len(mlflow_runs(repo))
    out = _run(repo, "dvc", "repro").stdout
    assert "Running stage" not in out
    assert len(mlflow_runs(repo)) == before


def test_dvc_exp_run_with_override(repo):
    baseline_lock = (repo / "dvc.lock").read_text()
    out = _run(repo, "dvc", "exp", "run", "-n", "no-mi", "-S", "adapt.sda.lambda2=0.0").stdout
    assert "Running stage 'adapt'" in out and "Running stage 'pretrain'" not in out
    assert "adapt.sda.lambda2" in _run(repo, "dvc", "exp", "show", "--csv").stdout
    # the experiment's runs are one MLflow filter away: tags.adaseg.dvc_exp = 'no-mi', one
    # per stage DVC ran (`report` only when evaluate's metrics changed on this tiny data)
    ran = set(re.findall(r"Running stage '([\w-]+)'", out))
    assert {"adapt", "evaluate"} <= ran
    runs = mlflow_runs(repo)
    mine = runs[runs["tags.adaseg.dvc_exp"] == "no-mi"]
    assert sorted(mine["tags.adaseg.stage"]) == sorted(ran)
    assert (mine["params.adapt.sda.lambda2"].dropna() == "0.0").all()
    out = _run(repo, "dvc", "exp", "run", "-S", "pretrain.epochs=1").stdout
    assert "Running stage 'pretrain'" in out and "Running stage 'prepare'" not in out
    assert pd.read_csv(repo / "plots/pretrain.csv")["epoch"].tolist() == [1]
    assert "pretrain.epochs" in _run(repo, "dvc", "exp", "show", "--csv").stdout
    # back to the baseline: its params, its lock and (from the cache) its outputs
    _run(repo, "git", "checkout", "--", "params.yaml")
    (repo / "dvc.lock").write_text(baseline_lock)
    _run(repo, "dvc", "checkout", "--force")
    assert "Running stage" not in _run(repo, "dvc", "repro").stdout


def test_killed_training_stage_resumes(repo):
    cmd = [
        "adaseg",
        "-S",
        "pretrain.epochs=4",
        "pretrain",
        "--data",
        "data/prepared",
        "--out",
        "resume/model",
        "--metrics",
        "resume/m.json",
        "--plots",
        "resume/p.csv",
    ]
    proc = start_killable(repo, cmd)
    storage = repo / ".adaseg/ray_results"

    def registered() -> bool:
        # a checkpoint counts once Ray Train's snapshot refers to it, not when its files appear
        snaps = list(storage.glob("pretrain-*/checkpoint_manager_snapshot.json"))
        return any("checkpoint_20" in p.read_text() for p in snaps)

    deadline = time.time() + 300
    while time.time() < deadline and not registered():
        time.sleep(0.5)
    assert registered(), "no checkpoint was registered"
    kill_group(proc)
    assert not (repo / "resume/model").exists()  # nothing half-written

    runs = mlflow_runs(repo)
    mine = (runs["tags.adaseg.stage"] == "pretrain") & (runs["params.pretrain.epochs"] == "4")
    killed = runs[mine & (runs["status"] == "RUNNING")]
    assert len(killed) == 1  # the killed stage's run, left open

    out = _run(repo, *cmd)
    assert "resuming after epoch" in out.stdout + out.stderr
    history = pd.read_csv(repo / "resume/p.csv")
    assert history["epoch"].tolist() == [1, 2, 3, 4]
    assert not list(storage.glob("pretrain-*"))  # resume state removed once materialised
    # the re-run continued the killed run: one run for both attempts, finished, no doubles
    key = killed["tags.adaseg.resume_key"].iloc[0]
    runs = mlflow_runs(repo)
    mine = runs[runs["tags.adaseg.resume_key"] == key]
    assert mine["run_id"].tolist() == killed["run_id"].tolist()
    assert mine["status"].tolist() == ["FINISHED"]
    assert mine["tags.adaseg.attempts"].tolist() == ["2"]
    import mlflow

    history = mlflow.MlflowClient().get_metric_history(mine["run_id"].iloc[0], "loss")
    assert [m.step for m in history] == [1, 2, 3, 4]  # each epoch logged once


def test_corrupt_shard_fails_cleanly(repo):
    bad = repo / "bad_data"
    shutil.copytree(repo / "data/prepared", bad)
    shard = sorted((bad / "target/test").glob("*.parquet"))[0]
    df = pd.read_parquet(shard)
    df.loc[1, "image_png"] = b"garbage"
    df.to_parquet(shard)
    proc = _run(
        repo,
        "adaseg",
        "evaluate",
        "--data",
        str(bad),
        "--models",
        "models/source_only",
        "--metrics",
        "bad/eval.json",
        "--predictions",
        "bad/predictions",
        "--overlays",
        "bad/overlays",
        check=False,
    )
    assert proc.returncode == 2
    assert str(shard) in proc.stderr and df.loc[1, "sample_id"] in proc.stderr
    assert "corrupt image" in proc.stderr
    assert not (repo / "bad").exists()


def test_bad_params_fail_before_any_work(repo):
    proc = _run(
        repo, "adaseg", "-S", "adapt.sda.gamma_min=0.95", "prepare", "--out", "never", check=False
    )
    assert proc.returncode == 2
    assert "adapt.sda: gamma_min (0.95) must be < gamma_max (0.9)" in proc.stderr
    assert not (repo / "never").exists()


def test_cpu_amp_without_native_bfloat16_is_refused(repo):
    """``amp`` on a CPU that would emulate bfloat16 (here: oneDNN capped at AVX2) stops with
    the field named instead of training ten times slower; nothing is written."""
    cmd = ["adaseg", "-S", "pretrain.amp=true", "pretrain", "--data", "data/prepared"]
    cmd += ["--out", "amp/model", "--metrics", "amp/m.json", "--plots", "amp/p.csv"]
    env = {**repo_env(repo), "ONEDNN_MAX_CPU_ISA": "AVX2"}
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "pretrain.amp: true trains in bfloat16 on this CPU" in proc.stderr
    assert not (repo / "amp").exists()


def test_prepared_data_is_deterministic(repo, tmp_path):
    _run(repo, "adaseg", "prepare", "--out", str(tmp_path / "again"))
    a = pd.read_parquet(repo / "data/prepared/target/train")
    b = pd.read_parquet(tmp_path / "again/target/train")
    assert a["query"].tolist() == b["query"].tolist()
    assert np.array_equal(a["image_png"].to_numpy(), b["image_png"].to_numpy())


def test_dvc_remote_round_trip(repo, tmp_path):
    """push to a local-directory remote, a fresh clone pulls, and its `dvc repro` has
    nothing to do; its metrics equal the original's (in a copy: the shared repo stays)."""
    work = tmp_path / "work"
    shutil.copytree(repo, work, ignore=shutil.ignore_patterns(".adaseg", "mlruns.db"))
    _run(work, "dvc", "repro")  # the copy in step with its own dvc.lock, whatever ran before
    remote = tmp_path / "remote"
    _run(work, "dvc", "remote", "add", "-d", "store", str(remote))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    _run(work, *git, "add", "dvc.lock", ".dvc/config", "params.yaml")
    _run(work, *git, "commit", "-qm", "lock and remote")
    _run(work, "dvc", "push")
    clone = tmp_path / "clone"
    _run(tmp_path, "git", "clone", "-q", str(work), str(clone))
    assert not (clone / "models/sda").exists()
    _run(clone, "dvc", "pull")
    assert (clone / "models/sda/model.pt").is_file()
    out = _run(clone, "dvc", "repro").stdout
    assert "Running stage" not in out and "up to date" in out

    # the default pipeline's metrics (the on-demand pipelines' are not cached, so not pushed)
    mine, pulled = dvc_metrics(work), dvc_metrics(clone)
    assert "metrics/eval.json" in pulled
    assert {k: mine[k] for k in pulled} == pulled
