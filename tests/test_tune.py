"""Ray Tune sweeps: search-space rules (fast), then real sweeps in the tiny DVC repo (slow).

The slow tests share the session's tiny repo (after `dvc repro`), real local Ray and a real
MLflow SQLite store: `dvc repro sweeps/dvc.yaml:tune` end to end, a crashing trial retried
then marked failed, SIGKILL of the sweep driver then resume without duplicate MLflow runs,
and a bad search space refused before any trial.
"""

from __future__ import annotations

import sqlite3
import subprocess
import time
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
import yaml

from components.config import SearchDim, parse_params
from pipelines import sweep_report, sweep_space
from pipelines import tune as sweep
from tests.conftest import (
    TINY_TUNE,
    kill_group,
    repo_env,
    run_in,
    start_killable,
    sweep_children,
    tune_cmd,
)


def _params(raw: dict, **tune):
    raw = dict(raw)
    raw["tune"] = {**raw["tune"], **tune}
    return parse_params(raw)


# --------------------------------------------------------------------------- fast
def test_grid_drops_pairs_with_gamma_min_not_below_gamma_max(tiny_raw):
    space = {
        "adapt.sda": {"gamma_max": {"values": [0.3, 0.9]}, "gamma_min": {"values": [0.1, 0.5]}}
    }
    points = sweep_space.grid_points(_params(tiny_raw, search="grid", space=space))
    assert {(p["adapt.sda.gamma_min"], p["adapt.sda.gamma_max"]) for p in points} == {
        (0.1, 0.3),
        (0.1, 0.9),
        (0.5, 0.9),
    }


def test_any_method_is_swept_through_its_own_section(tiny_raw):
    tiny_raw["adapt"] = {**tiny_raw["adapt"], "method": "dida"}
    tiny_raw["adapt"].pop("sda")
    space = {"adapt": {"lr": {"values": [1e-4]}, "dida": {"phi": {"values": [0.8, 0.9]}}}}
    params = _params(tiny_raw, space=space)
    points = sweep_space.grid_points(params)
    assert [p["adapt.dida.phi"] for p in points] == [0.8, 0.9]
    assert sweep_space.int_keys(_params(tiny_raw, space={"adapt": {"dida": {"bank_size": {
        "values": [100, 300]}}}})) == {"adapt.dida.bank_size"}  # fmt: skip
    # a trial's values become params the method section validates
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in tiny_raw.items()}
    raw["adapt"] = {**raw["adapt"], "dida": {"phi": points[0]["adapt.dida.phi"]}}
    raw["tune"] = {**raw["tune"], "space": space}
    assert parse_params(raw).adapt.method_config.phi == 0.8
    with pytest.raises(ValueError, match=r"tune.space.adapt.dida.nope: unknown parameter"):
        _params(tiny_raw, space={"adapt": {"dida": {"nope": {"values": [1]}}}})


def test_random_gamma_min_is_sampled_below_gamma_max():
    dim = SearchDim(low=0.05, high=0.9)
    rng = np.random.default_rng(0)
    for bound in np.linspace(0.1, 0.95, 40):
        value = sweep_space._below(dim, bound, rng)
        assert 0.05 <= value < bound
    assert sweep_space._below(SearchDim(values=[0.1, 0.5, 0.8]), 0.6, rng) in (0.1, 0.5)


def test_optuna_space_keeps_gamma_min_below_gamma_max(tiny_raw):
    space = {
        "adapt.sda": {
            "gamma_max": {"low": 0.2, "high": 0.9},
            "gamma_min": {"low": 0.1, "high": 0.8},
        }
    }
    define = sweep_space.optuna_space(_params(tiny_raw, search="optuna", space=space))
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(0))
    for _ in range(50):
        trial = study.ask()
        fixed = define(trial) or {}
        values = {**trial.params, **fixed}
        assert values["adapt/sda/gamma_min"] < values["adapt/sda/gamma_max"]
        study.tell(trial, 0.0)


@pytest.mark.parametrize("order", ["max_first", "min_first"])
def test_random_space_samples_valid_gamma_pairs_and_integers(tiny_raw, order):
    from ray.tune.search.variant_generator import generate_variants

    pair = [("gamma_max", {"low": 0.2, "high": 0.9}), ("gamma_min", {"low": 0.1, "high": 0.8})]
    adapt = dict(pair if order == "max_first" else pair[::-1])
    adapt["pixels"] = {"low": 64, "high": 512}
    params = _params(tiny_raw, search="random", space={"adapt.sda": adapt})
    space, _ = sweep_space.search_space(params)
    for _ in range(30):
        _, config = next(generate_variants(space))
        values = sweep_space.overrides_of(config)
        assert values["adapt.sda.gamma_min"] < values["adapt.sda.gamma_max"]
        assert (
            isinstance(values["adapt.sda.pixels"], int) and 64 <= values["adapt.sda.pixels"] <= 512
        )


def test_optuna_searcher_suggests_without_a_param_space(tiny_raw):
    space = {"adapt.sda": {"gamma_max": {"low": 0.5, "high": 0.9}, "lambda1": {"values": [0.5, 1]}}}
    params = _params(tiny_raw, search="optuna", space=space)
    param_space, searcher = sweep_space.search_space(params)
    assert param_space == {}  # Tune then never hands metric / mode to the searcher itself
    config = searcher.suggest("trial-1")
    assert set(sweep_space.overrides_of(config)) == {"adapt.sda.gamma_max", "adapt.sda.lambda1"}


def test_grid_repeats_use_successive_seeds(tiny_raw):
    params = _params(tiny_raw, num_samples=2)
    points = sweep_space.grid_points(params)
    assert len(points) == 8 and {p["seed"] for p in points} == {params.seed, params.seed + 1}


def test_trial_config_becomes_dotted_overrides():
    nested = {"semantics": {"tau": np.float64(0.3)}, "adapt": {"lambda1": 2.0}}
    assert sweep_space.overrides_of(nested) == {"semantics.tau": 0.3, "adapt.lambda1": 2.0}
    assert sweep_space.overrides_of({"adapt/sda/gamma_max": 0.8}) == {"adapt.sda.gamma_max": 0.8}
    assert sweep_space.overrides_of({"point": {"adapt.sda.lambda2": 0.5}}) == {
        "adapt.sda.lambda2": 0.5
    }


def test_best_params_file_is_a_params_overlay(tiny_raw, tmp_path):
    params = _params(tiny_raw)
    table = pd.DataFrame(
        {
            "trial_id": ["a", "b", "c", "d"],
            "status": ["COMPLETED", "STOPPED", "COMPLETED", "ERROR"],
            "epochs": [2, 1, 2, 0],
            "semantics.tau": [0.2, 0.5, 0.5, 0.2],
            "adapt.sda.gamma_max": [0.8, 0.8, 0.9, 0.9],
            "val_oiou": [0.4, 0.1, 0.5, np.nan],
            "unsup_confidence": [0.7, 0.2, 0.8, np.nan],
            "unsup_agreement": [0.5, 0.6, 0.4, np.nan],
        }
    )
    table["objective"] = table["val_oiou"]
    keys = ["semantics.tau", "adapt.sda.gamma_max"]
    text = sweep_report.best_params_yaml(table.iloc[2], keys, params.tune, "s")
    assert yaml.safe_load(text) == {"semantics": {"tau": 0.5}, "adapt": {"sda": {"gamma_max": 0.9}}}
    assert "-S semantics.tau=0.5 -S adapt.sda.gamma_max=0.9" in text
    plots = sweep_report.sensitivity_plots(table, keys, "val_oiou", tmp_path)
    assert [p.name for p in plots] == [f"sensitivity_{k}.png" for k in keys]
    assert all(p.stat().st_size > 0 for p in plots)
    assert "spearman_unsup_confidence_vs_val_oiou" not in sweep_report.rank_agreement(table)  # < 3


@pytest.mark.parametrize(
    ("tune", "message"),
    [
        ({"space": {"semantics": {"temp": {"values": [1]}}}}, "tune.space.semantics.temp: unknown"),
        ({"space": {"model": {"hidden": {"values": [8]}}}}, "model.hidden: not a tunable"),
        ({"space": {"adapt.sda": {"lambda1": {"values": []}}}}, "lambda1: values is empty"),
        ({"space": {"adapt.sda": {"lambda1": {"low": 2, "high": 1}}}}, "low (2.0) must be < high"),
        ({"space": {"semantics": {"tau": {"values": [0.1, -1]}}}}, "value -1 is refused"),
        ({"space": {"semantics": {"tau": {"low": 0, "high": 1, "log": True}}}}, "needs low > 0"),
        (
            {"space": {"adapt.sda": {"gamma_min": {"values": [0.95]}}}},
            "no gamma_min below it (smallest gamma_min: 0.95)",
        ),
        ({"metric": "accuracy"}, "tune.metric"),
        (
            {"search": "grid", "space": {"adapt.sda": {"lambda1": {"low": 0.1, "high": 1}}}},
            "grid search needs `values` for adapt.sda.lambda1",
        ),
        ({"space": {}}, "space is empty"),
    ],
)
def test_bad_search_spaces_are_refused_naming_the_entry(tiny_raw, tune, message):
    from components.config import ParamsError

    with pytest.raises(ParamsError) as err:
        _params(tiny_raw, **tune)
    assert message in str(err.value)


# --------------------------------------------------------------------------- slow
@pytest.mark.slow
def test_dvc_repro_tune_runs_the_sweep_and_tracks_every_trial(repo):
    assert not (repo / "tune").exists()  # the default `dvc repro` does not sweep
    run_in(repo, "dvc", "repro", "sweeps/dvc.yaml:tune")
    table = pd.read_parquet(repo / "tune/trials.parquet")
    assert len(table) == 4
    assert set(table.status) <= {"COMPLETED", "STOPPED"} and "COMPLETED" in set(table.status)
    assert sorted(zip(table["semantics.tau"], table["adapt.sda.gamma_max"], strict=True)) == [
        (0.2, 0.8),
        (0.2, 0.9),
        (0.5, 0.8),
        (0.5, 0.9),
    ]
    assert table["val_oiou"].notna().all() and table["unsup_agreement"].notna().all()
    done = table.assign(completed=table.status == "COMPLETED")
    best = done.sort_values(["completed", "objective"], ascending=False).iloc[0]
    overlay = yaml.safe_load((repo / "tune/best_params.yaml").read_text())
    assert overlay == {
        "semantics": {"tau": best["semantics.tau"]},
        "adapt": {"sda": {"gamma_max": best["adapt.sda.gamma_max"]}},
    }
    summary = yaml.safe_load((repo / "metrics/tune.json").read_text())
    assert summary["trials"] == 4 and summary["failed"] == 0
    assert summary["trial_epochs"] == table.epochs.sum() <= 4 * TINY_TUNE["epochs"]
    for key in ("semantics.tau", "adapt.sda.gamma_max"):
        assert (repo / f"plots/tune/sensitivity_{key}.png").is_file()

    children = sweep_children(repo, "sweep")  # tune.name: null
    assert len(children) == 4 and set(children.status) == {"FINISHED"}
    assert set(children["tags.adaseg.trial_id"]) == set(table.trial_id)
    assert set(children["params.adapt.sda.gamma_max"].astype(float)) == {0.8, 0.9}
    assert children["metrics.val_oiou"].notna().all()
    tagged = children[children["tags.adaseg.best"] == "true"]
    assert tagged["tags.adaseg.trial_id"].tolist() == [best.trial_id]
    assert children["tags.adaseg.dvc.init"].notna().all()  # tied to the upstream artefacts
    # a trial that changes tau re-runs the semantics; one that keeps it uses the cached labels
    reclustered = children[children["params.semantics.tau"].astype(float) == 0.5]
    assert reclustered["metrics.semantics_k_s"].notna().all()
    kept = children[children["params.semantics.tau"].astype(float) == 0.2]
    assert "metrics.semantics_k_s" not in kept or kept["metrics.semantics_k_s"].isna().all()


@pytest.mark.slow
def test_crashing_trial_is_retried_then_marked_failed(repo):
    env = {**repo_env(repo), sweep.FAILURE_ENV: "adapt.sda.gamma_max=0.8"}
    cmd = tune_cmd("failing", "fail", "-S", "tune.max_failures=1")
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = pd.read_parquet(repo / "fail/tune/trials.parquet")
    failed = table[table.status == "ERROR"]
    assert sorted(failed["adapt.sda.gamma_max"]) == [0.8, 0.8]
    assert failed["error"].str.contains("injected failure").all()
    assert (table[table.status != "ERROR"]["error"] == "").all()
    assert (table[table.status != "ERROR"]["adapt.sda.gamma_max"] == 0.9).all()
    assert yaml.safe_load((repo / "fail/tune/best_params.yaml").read_text())["adapt"] == {
        "sda": {"gamma_max": 0.9}
    }
    children = sweep_children(repo, "failing")
    bad = children[children["params.adapt.sda.gamma_max"].astype(float) == 0.8]
    assert len(bad) == 2 and set(bad.status) == {"FAILED"}
    assert set(bad["tags.adaseg.failures"]) == {"2"}  # retried once (max_failures), then failed
    assert bad["tags.adaseg.error"].str.contains("injected failure").all()
    assert set(children.drop(bad.index).status) == {"FINISHED"}


@pytest.mark.slow
def test_killed_sweep_resumes_without_rerunning_or_duplicating(repo):
    # one trial at a time, so that the kill lands between the first trial and the last
    cmd = tune_cmd(
        "resumed",
        "resume",
        *("-S", "tune.epochs=6", "-S", "tune.scheduler=fifo", "-S", "tune.max_concurrent=1"),
    )
    proc = start_killable(repo, cmd)

    def finished() -> list[str]:
        """Trial ids whose child run is FINISHED (read-only peek at the SQLite store)."""
        try:
            with sqlite3.connect(f"file:{repo / 'mlruns.db'}?mode=ro", uri=True) as db:
                rows = db.execute(
                    "select t2.value from runs r "
                    "join tags t on r.run_uuid = t.run_uuid "
                    "join tags t2 on r.run_uuid = t2.run_uuid "
                    "where t.key = 'adaseg.sweep_id' and t.value like 'resumed-%' "
                    "and t2.key = 'adaseg.trial_id' and r.status = 'FINISHED'"
                ).fetchall()
            return [r[0] for r in rows]
        except sqlite3.Error:
            return []

    def mid_trial() -> list[Path]:
        """Trial folders of unfinished trials that hold an epoch checkpoint."""
        done = finished()
        trials = (repo / ".adaseg/ray_results/tune").glob("resumed-*/*")
        return [t for t in trials if t.name not in done and any(t.glob("checkpoint_*"))]

    # kill once a trial has finished and the next one is part-way
    deadline = time.time() + 600
    while time.time() < deadline and not (finished() and mid_trial()):
        time.sleep(0.05)
    assert finished(), "no trial finished before the deadline"
    kill_group(proc)
    done_before = finished()
    assert len(done_before) < 4, "the sweep ended before it could be killed"
    assert not (repo / "resume/tune").exists()  # nothing half-written
    # the kill Tune cannot recover from on its own: it had registered a trial's new checkpoint
    # (and deleted the one before, num_to_keep) but not yet saved its experiment state, which
    # still names the deleted one; renaming the newest checkpoint makes that state here (when
    # the state names none yet, the trial starts over: either way every epoch is logged once)
    moved = mid_trial()
    assert moved, "the kill did not land part-way through a trial"
    for trial_dir in moved:
        newest = sorted(trial_dir.glob("checkpoint_*"))[-1]
        newest.rename(trial_dir / f"checkpoint_{int(newest.name.split('_')[1]) + 1:06d}")

    out = run_in(repo, *cmd)
    assert "resuming sweep resumed-" in out.stdout + out.stderr
    table = pd.read_parquet(repo / "resume/tune/trials.parquet")
    assert len(table) == 4
    assert (table.status == "COMPLETED").all(), table[["trial_id", "status", "epochs", "error"]]
    children = sweep_children(repo, "resumed")
    assert sorted(children["tags.adaseg.trial_id"]) == sorted(table.trial_id)  # no duplicates
    assert set(children.status) == {"FINISHED"}
    import mlflow

    client = mlflow.MlflowClient()
    for _, child in children.iterrows():
        # every epoch logged once: a finished trial whose end Tune had not yet saved resumes
        # from its last checkpoint with nothing to train; a resumed one's retrained epoch
        # is logged once
        steps = [m.step for m in client.get_metric_history(child.run_id, "val_oiou")]
        assert sorted(steps) == list(range(1, 7)), child["tags.adaseg.trial_id"]


@pytest.mark.slow
def test_bad_search_space_is_refused_before_any_trial(repo):
    for override, message in [
        ("tune.space.semantics.temperature={values: [0.1]}", "semantics.temperature: unknown"),
        ("tune.space.adapt.sda.lambda1={values: []}", "values is empty"),
        ("tune.space.adapt.sda.lambda1={low: 2, high: 1}", "low (2.0) must be < high (1.0)"),
        ("tune.metric=accuracy", "tune.metric"),
    ]:
        proc = run_in(repo, *tune_cmd("bad", "bad", "-S", override), check=False)
        assert proc.returncode == 2, override
        assert message in proc.stderr, proc.stderr
    assert not (repo / "bad").exists()
    assert not list((repo / ".adaseg/ray_results/tune").glob("bad-*"))


def test_a_restored_trial_whose_checkpoint_is_gone_resumes_from_the_newest_one_left(tmp_path):
    from ray import tune

    trial_dir = tmp_path / "sweep-x" / "abc_00001"
    for n in (2, 4):  # what Tune left: the named checkpoint 3 deleted, 4 registered after it
        (trial_dir / f"checkpoint_{n:06d}").mkdir(parents=True)
    known = tune.Checkpoint(str(trial_dir / "checkpoint_000002"))
    assert sweep.newest_checkpoint(known) is known  # still there: Tune's own
    found = sweep.newest_checkpoint(tune.Checkpoint(str(trial_dir / "checkpoint_000003")))
    assert found.path == str(trial_dir / "checkpoint_000004")
    assert sweep.newest_checkpoint(tune.Checkpoint(str(tmp_path / "gone/checkpoint_0"))) is None
