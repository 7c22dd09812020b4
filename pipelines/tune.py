"""Stage ``tune``: Ray Tune sweeps over SDA's temperatures, thresholds and loss weights.

What a trial does. It applies its values to the params and runs, in its own Ray process with
the trial's (fractional) CPUs / GPUs from ``tune.cpus_per_trial`` / ``gpus_per_trial``:

1. ``semantics`` again, only if the trial changes a ``semantics.*`` value (CSM from the cached
   stage-1 model); otherwise the labels of the cached ``semantics`` stage;
2. ``adapt`` for ``tune.epochs`` epochs from the cached ``init`` model and the cached
   semantic-based target masks, reporting after every epoch the labeled target-val metrics
   (``val_oiou``, ``val_miou``, ``val_map``) and two criteria that read no target labels
   (``unsup_confidence``, ``unsup_agreement``, see ``components.training``), with a
   checkpoint, so ASHA can stop it and a restored sweep resumes it mid-way.

The stage-1 model is never retrained. Choice: a trial that re-clusters keeps the ``init``
model and ``masks`` of the default semantics (they are starting points; retraining both per
trial would cost more than the adaptation itself); the sweep's winner is confirmed by
applying ``best_params.yaml`` and running ``dvc exp run``, which re-runs everything.

Tracking. Only this driver writes to MLflow (a Tune callback), so any number of concurrent
trials share the default SQLite store without "database is locked": one parent run per sweep,
one child run per trial (found again by its trial id on resume, never duplicated), the best
trial tagged ``adaseg.best``.

Resume. The sweep is named after a hash of its inputs and params (or ``tune.name``); if its
storage exists, ``Tuner.restore`` continues it: finished trials are kept, unfinished ones
resume from their last epoch checkpoint.

Fault injection (tests, drills): ``ADASEG_TUNE_INJECT_FAILURE="adapt.lambda2=0.5"`` makes every
trial whose values include all the given pairs raise.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import ray
import yaml
from ray import tune

from components.config import Params, SearchDim, TuneConfig, parse_params, set_dotted
from components.data.dataset import load_split
from components.data.schema import shard_paths
from components.io import atomic_path, fingerprint, write_json
from components.models.network import load_trained
from components.runtime import init_ray, storage_path
from components.tracking import stage_run, upstream_hashes
from pipelines import adapt, ray_train, semantics
from pipelines.common import repo_root

log = logging.getLogger(__name__)

UNSUPERVISED = ("unsup_confidence", "unsup_agreement")
FAILURE_ENV = "ADASEG_TUNE_INJECT_FAILURE"


# --------------------------------------------------------------------------- search space
def overrides_of(config: dict) -> dict[str, Any]:
    """A trial config (nested by section, Optuna's ``a/b`` keys, or a grid ``point``) as
    dotted params overrides ``{"adapt.gamma_max": 0.8, ...}``."""
    out: dict[str, Any] = {}

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            key = key.replace("/", ".")
            if key == "point":
                walk(value, prefix)
            elif isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                out[f"{prefix}{key}"] = value.item() if isinstance(value, np.generic) else value

    walk(config, "")
    return out


def _below(dim: SearchDim, bound: float, rng: np.random.Generator):
    """A value of ``dim`` strictly below ``bound`` (gamma_min given gamma_max)."""
    if dim.values is not None:
        ok = [v for v in dim.values if v < bound]
        return ok[int(rng.integers(len(ok)))] if ok else min(dim.values)
    high = min(dim.high, bound - 1e-3)
    if dim.log:
        return float(math.exp(rng.uniform(math.log(dim.low), math.log(high))))
    return float(rng.uniform(dim.low, high))


def grid_points(params: Params) -> list[dict[str, Any]]:
    """The Cartesian product of every entry's ``values``, without gamma_min >= gamma_max."""
    space = params.tune.flat_space()
    combos = itertools.product(*(d.values for d in space.values()))
    points = [dict(zip(space, combo, strict=True)) for combo in combos]
    gmin, gmax = params.adapt.gamma_min, params.adapt.gamma_max
    return [p for p in points if p.get("adapt.gamma_min", gmin) < p.get("adapt.gamma_max", gmax)]


def optuna_space(params: Params):
    """Optuna define-by-run space: gamma_max is drawn first, gamma_min below it."""
    space, seed = params.tune.flat_space(), params.seed
    gmin_key, gmax_key = "adapt.gamma_min", "adapt.gamma_max"
    fixed_max = params.adapt.gamma_max if gmax_key not in space else None
    fixed_min = params.adapt.gamma_min if gmin_key not in space else None

    def define(trial):  # Optuna define-by-run: the pair's order makes the constraint hold
        chosen: dict[str, Any] = {}
        fixed: dict[str, Any] = {}  # returned values override what Optuna recorded
        for key, dim in sorted(space.items(), key=lambda kv: kv[0] == gmin_key):
            name = key.replace(".", "/")
            if dim.values is not None:
                value = trial.suggest_categorical(name, dim.values)
                bound = chosen.get(gmax_key, fixed_max)
                if key == gmin_key and value >= bound:  # categorical spaces must stay static
                    value = fixed[name] = _below(dim, bound, np.random.default_rng(seed))
            else:
                low, high = dim.low, dim.high
                if key == gmin_key:
                    high = min(high, chosen.get(gmax_key, fixed_max) - 1e-3)
                if key == gmax_key:
                    floor = space[gmin_key].candidates() if gmin_key in space else [fixed_min]
                    low = max(low, min(floor) + 2e-3)
                value = trial.suggest_float(name, low, high, log=dim.log)
            chosen[key] = value
        return fixed or None

    return define


def search_space(params: Params):
    """Tune's ``param_space`` and search algorithm for ``params.tune``."""
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    tcfg, seed = params.tune, params.seed
    space = tcfg.flat_space()
    gmin_key, gmax_key = "adapt.gamma_min", "adapt.gamma_max"
    # each bound of the pair, where the other is fixed by params instead of swept
    fixed_max = params.adapt.gamma_max if gmax_key not in space else None
    fixed_min = params.adapt.gamma_min if gmin_key not in space else None

    if tcfg.search == "grid":
        return {"point": tune.grid_search(grid_points(params))}, BasicVariantGenerator(
            random_state=seed
        )

    if tcfg.search == "random":
        nested: dict[str, dict] = {}
        for key, dim in space.items():
            section, name = key.split(".")
            if key == gmin_key:
                gmax = (
                    (lambda c: c["adapt"]["gamma_max"])
                    if fixed_max is None
                    else (lambda c: fixed_max)
                )
                dom = tune.sample_from(
                    lambda spec, d=dim, g=gmax: _below(
                        d, g(spec.config), np.random.default_rng([seed, int(g(spec.config) * 1e9)])
                    )
                )
            elif dim.values is not None:
                dom = tune.choice(dim.values)
            else:
                low = dim.low
                if key == gmax_key:  # leave room for a gamma_min below it
                    floor = space[gmin_key].candidates() if gmin_key in space else [fixed_min]
                    low = max(low, min(floor) + 2e-3)
                dom = tune.loguniform(low, dim.high) if dim.log else tune.uniform(low, dim.high)
            nested.setdefault(section, {})[name] = dom
        return nested, BasicVariantGenerator(random_state=seed)

    from ray.tune.search.optuna import OptunaSearch

    define = optuna_space(params)
    searcher = OptunaSearch(space=define, seed=seed)
    if tcfg.max_concurrent:
        searcher = ConcurrencyLimiter(searcher, max_concurrent=tcfg.max_concurrent)
    return {}, searcher


def scheduler(tcfg: TuneConfig):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if tcfg.scheduler == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="training_iteration",
        max_t=tcfg.epochs,
        grace_period=tcfg.grace_period,
        reduction_factor=tcfg.reduction_factor,
    )


# --------------------------------------------------------------------------- the trial
def _fault(spec: str | None) -> dict[str, Any]:
    if not spec:
        return {}
    pairs = [kv.split("=", 1) for kv in spec.split(",") if kv.strip()]
    return {k.strip(): yaml.safe_load(v) for k, v in pairs}


def trial(config: dict, ctx: dict) -> None:
    """One sweep trial (runs in a Ray Tune trial process)."""
    import torch

    overrides = overrides_of(config)
    fault = ctx["fault"]
    if fault and all(overrides.get(k) == v for k, v in fault.items()):
        raise RuntimeError(f"injected failure ({FAILURE_ENV}) for {overrides}")
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in ctx["base"].items()}
    for key, value in overrides.items():
        set_dotted(raw, key, value)
    set_dotted(raw, "adapt.epochs", raw["tune"]["epochs"])
    params = parse_params(raw, "trial")
    threads = max(1, int(ctx["cpus"]))
    torch.set_num_threads(threads)

    labels, extra = ctx["labels"], {}
    base_semantics = ctx["base"]["semantics"]
    if any(
        k.startswith("semantics.") and base_semantics[k.split(".", 1)[1]] != v
        for k, v in overrides.items()
    ):
        source, target = ray.get(ctx["source_ref"]), ray.get(ctx["target_ref"])
        res, diag = semantics.compute(ctx["stage1"], source, target, params)
        labels = (res.labels_s, res.labels_t, res.reliable_t)
        extra = {f"semantics_{k}": float(v) for k, v in diag.items()}

    config = adapt.phase_config(
        params,
        ctx["vocab_size"],
        ctx["init_state"],
        labels,
        (ctx["source_ref"], ctx["adapt_target_ref"], ctx["val_ref"]),
    )
    config.update(
        phase="adapt",
        setup=adapt.setup_adapt,
        seed=params.seed,
        threads=threads,
        progress=False,
        standalone=True,
        use_gpu=ctx["gpus"] > 0,
    )

    def report(row: dict, checkpoint=None) -> None:
        tune.report({**row, **extra}, checkpoint=checkpoint)

    ray_train.run_phase(config, 0, tune.get_checkpoint, report)


# --------------------------------------------------------------------------- MLflow
class MlflowTrials(tune.Callback):
    """Driver-side MLflow logging: one child run per trial under the sweep's parent run."""

    def __init__(self, uri: str, experiment_id: str, parent: str, sweep: str, tags: dict):
        self.uri, self.experiment_id, self.parent, self.sweep = uri, experiment_id, parent, sweep
        self.tags = tags
        self._runs: dict[str, str] = {}
        self._client = None

    def __getstate__(self):  # Tune pickles callbacks with its experiment state
        state = dict(self.__dict__)
        state["_client"] = None
        return state

    @property
    def client(self):
        if self._client is None:
            self._client = mlflow.MlflowClient(self.uri)
        return self._client

    def find(self, trial_id: str) -> str | None:
        """The child run already made for ``trial_id`` (this session or a resumed one's)."""
        if trial_id not in self._runs:
            found = self.client.search_runs(
                [self.experiment_id],
                filter_string=f"tags.mlflow.parentRunId = '{self.parent}' "
                f"and tags.`adaseg.trial_id` = '{trial_id}'",
                max_results=1,
            )
            if not found:
                return None
            self._runs[trial_id] = found[0].info.run_id
        return self._runs[trial_id]

    def run_id(self, trial) -> str:
        """The trial's child run: the one already made for it (a resumed sweep), or a new one."""
        run_id = self.find(trial.trial_id)
        if run_id:
            if self.client.get_run(run_id).info.status != "RUNNING":
                self.client.update_run(run_id, status="RUNNING")
        else:
            values = overrides_of(trial.config)
            name = " ".join(f"{k.split('.')[-1]}={_short(v)}" for k, v in values.items())
            run = self.client.create_run(
                self.experiment_id,
                run_name=f"{trial.trial_id} {name}"[:250],
                tags={
                    **self.tags,
                    "mlflow.parentRunId": self.parent,
                    "adaseg.stage": "tune-trial",
                    "adaseg.sweep_id": self.sweep,
                    "adaseg.trial_id": trial.trial_id,
                },
            )
            run_id = run.info.run_id
            self.client.log_batch(
                run_id, params=[mlflow.entities.Param(k, str(v)) for k, v in values.items()]
            )
        self._runs[trial.trial_id] = run_id
        return run_id

    def on_trial_start(self, iteration, trials, trial, **info):
        self.run_id(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        step = int(result.get("training_iteration", 0))
        metrics = [
            mlflow.entities.Metric(k, float(v), int(result.get("timestamp", 0)) * 1000, step)
            for k, v in result.items()
            if _reported(k) and isinstance(v, int | float) and math.isfinite(v)
        ]
        self.client.log_batch(self.run_id(trial), metrics=metrics)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.client.set_terminated(self.run_id(trial), status="FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        # called once Tune gives up on the trial (after tune.max_failures retries)
        run_id = self.run_id(trial)
        self.client.set_tag(run_id, "adaseg.failures", trial.num_failures)
        self.client.set_tag(run_id, "adaseg.error", _last_error_line(trial.error_file))
        self.client.set_terminated(run_id, status="FAILED")


def _last_error_line(path: str | None) -> str:
    try:
        lines = [ln for ln in Path(path).read_text().splitlines() if ln.strip()]
        return lines[-1][:1000] if lines else "trial failed"
    except (OSError, TypeError):
        return "trial failed"


def _reported(key: str) -> bool:
    return key.startswith(("val_", "unsup_", "semantics_", "loss")) or key in ("epoch", "seconds")


def _short(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


# --------------------------------------------------------------------------- results
def trials_table(results, tcfg: TuneConfig, keys: list[str]) -> pd.DataFrame:
    """One row per trial: status, epochs run, swept values, last reported metrics."""
    rows = []
    for r in results:
        m = r.metrics or {}
        values = overrides_of(r.config or {})
        epochs = int(m.get("training_iteration", 0) or 0)
        status = "ERROR" if r.error else ("COMPLETED" if epochs >= tcfg.epochs else "STOPPED")
        row = {
            "trial_id": m.get("trial_id") or Path(r.path).name,  # dirname = trial id
            "status": status,
            "epochs": epochs,
            **{k: values.get(k) for k in keys},
        }
        for name in ("val_oiou", "val_miou", "val_map", *UNSUPERVISED):
            row[name] = float(m[name]) if name in m else float("nan")
        row["objective"] = row[tcfg.metric]
        rows.append(row)
    return pd.DataFrame(rows)


def rank_agreement(table: pd.DataFrame) -> dict[str, float]:
    """Spearman correlation of each label-free criterion with labeled target-val oIoU, over
    trials that ran every epoch (how well it would rank trials without target labels)."""
    from scipy.stats import spearmanr

    done = table[table.status == "COMPLETED"]
    out = {}
    for name in UNSUPERVISED:
        ok = done[[name, "val_oiou"]].dropna()
        if len(ok) >= 3 and ok[name].nunique() > 1 and ok["val_oiou"].nunique() > 1:
            out[f"spearman_{name}_vs_val_oiou"] = float(spearmanr(ok[name], ok["val_oiou"])[0])
    return out


def best_params_yaml(best: pd.Series, keys: list[str], tcfg: TuneConfig, sweep: str) -> str:
    overlay: dict[str, dict] = {}
    for key in keys:
        section, name = key.split(".")
        value = best[key]
        overlay.setdefault(section, {})[name] = value.item() if hasattr(value, "item") else value
    sets = " ".join(f"-S {k}={_short(best[k])}" for k in keys)
    header = (
        f"# best trial {best.trial_id} of sweep {sweep}: {tcfg.metric} = {best.objective:.4f}"
        f" after {best.epochs} epochs\n# apply: dvc exp run {sets}\n"
    )
    return header + yaml.safe_dump(overlay, sort_keys=False)


def sensitivity_plots(table: pd.DataFrame, keys: list[str], metric: str, out: Path) -> list[Path]:
    """The objective against each swept value (Fig. 5 / 6 / 10 style): one line per fixed
    setting of the other values when they take few distinct values (a grid), else points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = table[table.status != "ERROR"].dropna(subset=["objective"])
    paths = []
    for key in keys:
        others = [k for k in keys if k != key]
        fig, ax = plt.subplots(figsize=(4.5, 3.2))
        groups = done.groupby(others, dropna=False) if others else [((), done)]
        if others and len(done) and done[others].drop_duplicates().shape[0] > 8:
            groups = [("all trials", done)]
        for label, g in groups:
            g = g.sort_values(key)
            text = (
                label
                if isinstance(label, str)
                else ", ".join(
                    f"{o.split('.')[-1]}={_short(v)}"
                    for o, v in zip(others, np.atleast_1d(label), strict=False)
                )
            )
            style = "o" if label == "all trials" else "o-"
            ax.plot(g[key], g["objective"], style, ms=4, label=text or None)
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        if key.endswith(("tau", "temperature", "lambda1", "lambda2")) and (done[key] > 0).all():
            ax.set_xscale("log")
        if ax.get_legend_handles_labels()[0] and len(ax.get_legend_handles_labels()[0]) <= 6:
            ax.legend(fontsize=6)
        fig.tight_layout()
        path = out / f"sensitivity_{key}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------- the stage
def sweep_inputs(data_dir: Path, base: Path, init: Path, sem_dir: Path, masks: Path):
    """The files a sweep starts from (they name it, with the params)."""
    return [
        *shard_paths(data_dir, "source", "train"),
        base / "model.pt",
        init / "model.pt",
        sem_dir / "labels.parquet",
        masks / "semantic_masks.parquet",
    ]


def sweep_name(params: Params, inputs: list[Path]) -> str:
    if params.tune.name:
        return params.tune.name
    used = params.model_dump(mode="json", include={"seed", "model", "semantics", "adapt", "tune"})
    return "sweep-" + fingerprint(inputs, used)


def run(
    params: Params,
    name: str,
    data_dir: Path,
    base: Path,
    init: Path,
    sem_dir: Path,
    masks: Path,
    out: Path,
    plots: Path,
    metrics_path: Path,
) -> dict:
    from ray.tune import CheckpointConfig, FailureConfig, RunConfig, Tuner
    from ray.tune import TuneConfig as RayTuneConfig

    tcfg, root = params.tune, repo_root()
    storage = tcfg.storage_path or f"{storage_path(params.runtime, root).rstrip('/')}/tune"
    if "://" not in storage:
        storage = str(Path(storage) if Path(storage).is_absolute() else (root / storage).resolve())
    keys = list(tcfg.flat_space())

    vocab, (source, target, val), labels = adapt.load_inputs(params, data_dir, sem_dir, masks)
    raw_target = load_split(
        data_dir, "target", "train", vocab, params.model.max_words, params.model.num_superpixels
    )
    init_model, _ = load_trained(init)
    stage1, _ = load_trained(base)
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    init_ray(params.runtime)
    ctx = {
        "base": params.model_dump(mode="json"),
        "fault": _fault(os.environ.get(FAILURE_ENV)),
        "cpus": tcfg.cpus_per_trial,
        "gpus": tcfg.gpus_per_trial,
        "vocab_size": len(vocab),
        "init_state": init_model.state_dict(),
        "stage1": stage1,
        "labels": labels,
        "source_ref": ray.put(source),
        "target_ref": ray.put(raw_target),  # CSM reads only images and queries
        "adapt_target_ref": ray.put(target),  # semantic-based masks in place of labels
        "val_ref": ray.put(val),
    }
    trainable = tune.with_resources(
        tune.with_parameters(trial, ctx=ctx),
        {"cpu": tcfg.cpus_per_trial, "gpu": tcfg.gpus_per_trial},
    )

    active = mlflow.active_run()
    parent = active.info.run_id
    mlflow.set_tags({"adaseg.sweep_id": name, **upstream_hashes(root)})
    callback = MlflowTrials(
        mlflow.get_tracking_uri(),
        active.info.experiment_id,
        parent,
        name,
        {
            "adaseg.pipeline_id": active.data.tags.get("adaseg.pipeline_id", ""),
            **upstream_hashes(root),
        },
    )
    path = f"{storage.rstrip('/')}/{name}"
    if Tuner.can_restore(path):
        log.info("tune: resuming sweep %s from %s", name, path)
        tuner = Tuner.restore(path, trainable, resume_unfinished=True)
    else:
        param_space, searcher = search_space(params)
        tuner = Tuner(
            trainable,
            param_space=param_space,
            tune_config=RayTuneConfig(
                metric=tcfg.metric,
                mode="max",
                search_alg=searcher,
                scheduler=scheduler(tcfg),
                num_samples=tcfg.num_samples,
                max_concurrent_trials=tcfg.max_concurrent,
                trial_dirname_creator=lambda t: t.trial_id,
            ),
            run_config=RunConfig(
                name=name,
                storage_path=storage,
                failure_config=FailureConfig(max_failures=tcfg.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=1),
                callbacks=[callback],
                verbose=1,
            ),
        )
    results = tuner.fit()
    table = trials_table(results, tcfg, keys)
    ok = table[table.status != "ERROR"].dropna(subset=["objective"])
    if ok.empty:
        raise RuntimeError(f"tune: every trial of sweep {name} failed; see {path}")
    best = ok.sort_values(["objective", "epochs"], ascending=False).iloc[0]
    summary = {
        "trials": len(table),
        "completed": int((table.status == "COMPLETED").sum()),
        "stopped_early": int((table.status == "STOPPED").sum()),
        "failed": int((table.status == "ERROR").sum()),
        "trial_epochs": int(table.epochs.sum()),
        "best_" + tcfg.metric: float(best.objective),
        **{f"best_{k}": float(best[k]) for k in ("val_oiou", "val_miou", "val_map")},
        **rank_agreement(table),
    }
    with atomic_path(out, is_dir=True) as tmp:
        table.to_parquet(tmp / "trials.parquet", index=False)
        (tmp / "best_params.yaml").write_text(best_params_yaml(best, keys, tcfg, name))
    with atomic_path(plots, is_dir=True) as tmp:
        sensitivity_plots(table, keys, tcfg.metric, tmp)
    write_json(metrics_path, summary)

    best_run = callback.find(best.trial_id)
    if best_run:
        callback.client.set_tag(best_run, "adaseg.best", "true")
        mlflow.set_tag("adaseg.best_run_id", best_run)
    mlflow.log_metrics({k: v for k, v in summary.items() if math.isfinite(v)})
    mlflow.log_artifacts(str(out), artifact_path="tune")
    mlflow.log_artifacts(str(plots), artifact_path="sensitivity")
    return summary


def main(
    params: Params,
    data: str,
    base: str,
    init: str,
    sem_dir: str,
    masks: str,
    out: str,
    plots: str,
    metrics: str,
) -> None:
    used = {"seed": params.seed, "tune": params.tune.model_dump(mode="json")}
    paths = [Path(p) for p in (data, base, init, sem_dir, masks)]
    name = sweep_name(params, sweep_inputs(*paths))
    with stage_run("tune", params.runtime, used, repo_root(), name, ("adaseg.sweep_id", name)):
        summary = run(
            params,
            name,
            Path(data),
            Path(base),
            Path(init),
            Path(sem_dir),
            Path(masks),
            Path(out),
            Path(plots),
            Path(metrics),
        )
    log.info("tune: %s", {k: round(v, 4) for k, v in summary.items()})
