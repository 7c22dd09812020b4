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
trial tagged ``adaseg.best``. A child run also carries ``adaseg.trial_nodes`` (the Ray nodes
its attempts ran on) and, once Tune retried it (a crash, a lost node: ``tune.max_failures``),
``adaseg.trial_restarts`` and ``adaseg.last_error``.

Resume. The sweep is named after a hash of its inputs and params (or ``tune.name``); if its
storage exists, ``Tuner.restore`` continues it: finished trials are kept, unfinished ones
resume from their last epoch checkpoint (the newest one on storage when the one Tune recorded
was already replaced, see :class:`ResumeFromNewest`). An epoch trained again after a resume is
logged to MLflow once (steps are the trial's own epoch count).

Fault injection (tests, drills): ``ADASEG_TUNE_INJECT_FAILURE="adapt.lambda2=0.5"`` makes every
trial whose values include all the given pairs raise.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import mlflow
import ray
import yaml
from ray import tune

from components import train_loop
from components.adaptation.base import Upstream
from components.adaptation.phase import AdaptInputs, load_inputs, load_source_val, setup_adapt
from components.adaptation.registry import METHODS
from components.adaptation.sda import semantics
from components.adaptation.sda.method import SDA
from components.adaptation.self_training import MeanTeacherMethod
from components.config import Params, ParamsError, parse_params, set_dotted
from components.data.schema import shard_paths
from components.io import atomic_path, code_fingerprint, fingerprint, write_json
from components.models.network import load_trained
from components.runtime import init_ray, remove_storage, resolve_storage, storage_path
from components.stage_io import load_task_split
from components.tracking import stage_run, upstream_hashes
from pipelines.common import repo_root
from pipelines.sweep_report import (
    best_params_yaml,
    compact,
    last_line,
    rank_agreement,
    result_epoch,
    sensitivity_plots,
    trials_table,
)
from pipelines.sweep_space import overrides_of, scheduler, search_space

log = logging.getLogger(__name__)

FAILURE_ENV = "ADASEG_TUNE_INJECT_FAILURE"


# --------------------------------------------------------------------------- the trial
def _fault(spec: str | None) -> dict[str, Any]:
    if not spec:
        return {}
    pairs = [kv.split("=", 1) for kv in spec.split(",") if kv.strip()]
    return {k.strip(): yaml.safe_load(v) for k, v in pairs}


@dataclass(frozen=True)
class TrialContext:
    """What every trial reads besides its values (put in the object store once)."""

    params: Params  # the sweep's validated params; a trial applies its values to them
    fault: dict[str, Any]  # injected failure: trials whose values match all pairs raise
    cpus: float
    gpus: float
    stage1: Any  # the stage-1 network (CSM re-runs from it)
    inputs: AdaptInputs  # the adaptation inputs of the default semantics
    target_ref: ray.ObjectRef  # target train split as CSM reads it
    vocab: Any  # the vocabulary (CSM's word grounding reads it)


def trial(config: dict, ctx: TrialContext) -> None:
    """One sweep trial (runs in a Ray Tune trial process)."""
    import torch

    overrides = overrides_of(config)
    if ctx.fault and all(overrides.get(k) == v for k, v in ctx.fault.items()):
        raise RuntimeError(f"injected failure ({FAILURE_ENV}) for {overrides}")
    # the trial's values make new params: validated like any params file
    raw = ctx.params.model_dump(mode="json", exclude_none=True)
    for key, value in overrides.items():
        set_dotted(raw, key, value)
    set_dotted(raw, "adapt.epochs", raw["tune"]["epochs"])
    params = parse_params(raw, "trial")
    threads = max(1, int(ctx.cpus))
    torch.set_num_threads(threads)

    inputs, extra = ctx.inputs, {}
    if "semantics" in METHODS[params.adapt.method].requires and any(
        k.startswith("semantics.") and getattr(ctx.params.semantics, k.split(".", 1)[1]) != v
        for k, v in overrides.items()
    ):
        source, target = ray.get(inputs.source_ref), ray.get(ctx.target_ref)
        res, diag = semantics.compute(ctx.stage1, source, target, params, ctx.vocab)
        inputs = replace(inputs, upstream=Upstream(res.labels_s, res.labels_t, res.reliable_t))
        extra = {f"semantics_{k}": float(v) for k, v in diag.items()}

    spec = train_loop.PhaseSpec("adapt", setup_adapt, params, inputs)
    spec = train_loop.standalone(spec, threads, use_gpu=ctx.gpus > 0)

    node = ray.get_runtime_context().get_node_id()

    def report(row: dict, checkpoint=None) -> None:
        # node_id: where this attempt runs (a trial retried after a lost node moves)
        tune.report({**row, **extra, "node_id": node}, checkpoint=checkpoint)

    # the row of the epoch it resumes after goes to Tune again: its record of the trial may
    # end one epoch earlier (see ResumeFromNewest); MLflow logs each epoch once
    train_loop.run_phase(spec, 0, tune.get_checkpoint, report, tune.Checkpoint, report_last=True)


def newest_checkpoint(checkpoint):
    """``checkpoint`` if it is still on storage, else its trial's newest one there (None when
    none is left)."""
    import pyarrow.fs as pafs

    fs = checkpoint.filesystem
    if fs.get_file_info(checkpoint.path).type == pafs.FileType.Directory:
        return checkpoint
    trial_dir = checkpoint.path.rstrip("/").rsplit("/", 1)[0]
    found = fs.get_file_info(pafs.FileSelector(trial_dir, allow_not_found=True))
    kept = sorted(
        f.path
        for f in found
        if f.type == pafs.FileType.Directory and f.base_name.startswith("checkpoint_")
    )
    log.warning(
        "tune: checkpoint %s is gone (sweep killed while Tune replaced it); resuming from %s",
        checkpoint.path,
        kept[-1] if kept else "the first epoch",
    )
    return type(checkpoint)(kept[-1], filesystem=fs) if kept else None


class ResumeFromNewest:
    """Mixin of the trial's Tune trainable: restore from the trial's newest checkpoint.

    Tune deletes a trial's older checkpoint (``num_to_keep``) as soon as it registers a new
    one but saves its experiment state later, so a sweep killed in between is restored with a
    checkpoint that no longer exists, and Tune fails the trial ("Could not recover from
    checkpoint"). Here it resumes from the newest checkpoint left instead (an epoch later than
    Tune's record: the trial reports that epoch's row again), or from the start.
    """

    def restore(self, checkpoint_path):
        checkpoint = getattr(checkpoint_path, "checkpoint", None)
        if checkpoint is not None:
            found = newest_checkpoint(checkpoint)
            if found is None:
                return None  # nothing left: the trial trains from its first epoch
            checkpoint_path = type(checkpoint_path)(found, checkpoint_path.metrics)
        return super().restore(checkpoint_path)


trial.__mixins__ = (ResumeFromNewest,)  # Tune builds the trial's trainable class with it


# --------------------------------------------------------------------------- MLflow
class MlflowTrials(tune.Callback):
    """Driver-side MLflow logging: one child run per trial under the sweep's parent run."""

    def __init__(self, uri: str, experiment_id: str, parent: str, sweep: str, tags: dict):
        self.uri, self.experiment_id, self.parent, self.sweep = uri, experiment_id, parent, sweep
        self.tags = tags
        self._runs: dict[str, str] = {}
        self._nodes: dict[str, list[str]] = {}  # trial id -> Ray node ids, in order
        self._steps: dict[str, int] = {}  # trial id -> last epoch logged
        self._client = None

    def __getstate__(self):  # Tune pickles callbacks with its experiment state
        state = dict(self.__dict__)
        state["_client"] = None
        state["_steps"] = {}  # read again from MLflow: the store may be ahead of the snapshot
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
            name = " ".join(f"{k.split('.')[-1]}={compact(v)}" for k, v in values.items())
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
        step = result_epoch(result)
        run_id = self.run_id(trial)
        if trial.trial_id not in self._steps:  # a resumed sweep: the epochs logged before
            history = self.client.get_metric_history(run_id, "epoch")
            self._steps[trial.trial_id] = max((m.step for m in history), default=0)
        # an epoch re-run after a restore from an earlier checkpoint is logged once
        if step > self._steps[trial.trial_id]:
            self._steps[trial.trial_id] = step
            metrics = [
                mlflow.entities.Metric(k, float(v), int(result.get("timestamp", 0)) * 1000, step)
                for k, v in result.items()
                if _reported(k) and isinstance(v, int | float) and math.isfinite(v)
            ]
            self.client.log_batch(run_id, metrics=metrics)
        node = result.get("node_id")
        if trial.trial_id not in self._nodes:  # a resumed sweep: the nodes tagged before
            tagged = self.client.get_run(run_id).data.tags.get("adaseg.trial_nodes", "")
            self._nodes[trial.trial_id] = [n for n in tagged.split(",") if n]
        seen = self._nodes[trial.trial_id]
        if node and node not in seen:
            seen.append(node)
            self.client.set_tag(run_id, "adaseg.trial_nodes", ",".join(seen))

    def on_trial_recover(self, iteration, trials, trial, **info):
        # a failed attempt Tune will retry from the trial's last checkpoint (tune.max_failures)
        run_id = self.run_id(trial)
        self.client.set_tag(run_id, "adaseg.trial_restarts", trial.num_failures)
        self.client.set_tag(run_id, "adaseg.last_error", _last_error_line(trial.error_file))

    def on_trial_complete(self, iteration, trials, trial, **info):
        # also called for trials stopped before they started: they have no run to close
        run_id = self.find(trial.trial_id)
        if run_id:
            self.client.set_terminated(run_id, status="FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        # called once Tune gives up on the trial (after tune.max_failures retries)
        run_id = self.run_id(trial)
        self.client.set_tag(run_id, "adaseg.failures", trial.num_failures)
        self.client.set_tag(run_id, "adaseg.error", _last_error_line(trial.error_file))
        self.client.set_terminated(run_id, status="FAILED")


def _last_error_line(path: str | None) -> str:
    try:
        return last_line(Path(path).read_text(), "trial failed")
    except (OSError, TypeError):
        return "trial failed"


def _reported(key: str) -> bool:
    return key.startswith(("val_", "unsup_", "semantics_", "loss")) or key in ("epoch", "seconds")


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
    """``<tune.name or "sweep">-<hash of inputs, params and code>``: re-running the same sweep
    after a crash resumes it; any change of inputs, params or code starts a new one."""
    used = params.model_dump(
        mode="json", include={"seed", "data", "model", "semantics", "adapt", "tune"}
    )
    used["code"] = code_fingerprint()
    return f"{params.tune.name or 'sweep'}-{fingerprint(inputs, used)}"


def _restorable(path: str) -> bool:
    """A sweep that got as far as writing its experiment state (``tuner.pkl`` alone is
    written before the first trial starts, and restoring from it alone loses the space)."""
    import pyarrow.fs as pafs
    from ray.tune import Tuner

    if not Tuner.can_restore(path):
        return False
    fs, base = pafs.FileSystem.from_uri(path if "://" in path else Path(path).as_uri())
    found = fs.get_file_info(pafs.FileSelector(base, recursive=False))
    return any(Path(f.path).name.startswith("experiment_state") for f in found)


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
    storage = (
        resolve_storage(tcfg.storage_path, root)
        if tcfg.storage_path
        else f"{storage_path(params.runtime, root).rstrip('/')}/tune"
    )
    keys = list(tcfg.flat_space())

    vocab, task, (source, target, val), upstream = load_inputs(params, data_dir, sem_dir, masks)
    # CSM reads only the target images and queries; its extraction needs the masks' shape
    raw_target = load_task_split(params, data_dir, "target", "train", task, vocab)
    init_model, _ = load_trained(init)
    stage1, _ = load_trained(base)
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    init_ray(params.runtime)
    inputs = AdaptInputs(
        task,
        len(vocab),
        init_model.state_dict(),
        upstream,
        ray.put(source),
        ray.put(target),  # semantic-based masks in place of labels
        ray.put(val),
        # every trial reports the label-free criteria, to rank them against target val
        ray.put(load_source_val(params, data_dir, task, vocab)),
    )
    ctx = TrialContext(
        params,
        _fault(os.environ.get(FAILURE_ENV)),
        tcfg.cpus_per_trial,
        tcfg.gpus_per_trial,
        stage1,
        inputs,
        ray.put(raw_target),  # CSM reads only images and queries
        vocab,
    )
    trainable = tune.with_resources(
        tune.with_parameters(trial, ctx=ctx),
        {"cpu": tcfg.cpus_per_trial, "gpu": tcfg.gpus_per_trial},
    )

    active = mlflow.active_run()
    parent = active.info.run_id
    upstream = upstream_hashes(root)
    mlflow.set_tags({"adaseg.sweep_id": name, **upstream})
    callback = MlflowTrials(
        mlflow.get_tracking_uri(),
        active.info.experiment_id,
        parent,
        name,
        {"adaseg.pipeline_id": active.data.tags.get("adaseg.pipeline_id", ""), **upstream},
    )
    path = f"{storage.rstrip('/')}/{name}"
    param_space, searcher = search_space(params)
    if _restorable(path):
        log.info("tune: resuming sweep %s from %s", name, path)
        tuner = Tuner.restore(
            path, trainable, resume_unfinished=True, param_space=param_space or None
        )
    else:
        remove_storage(path)  # a start that never got to its first trial
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
    unfinished = _unfinished(results)
    if unfinished:  # e.g. Ctrl-C: Tune returns early; nothing is written, re-run to resume
        raise RuntimeError(f"tune: sweep {name} interrupted ({len(unfinished)} trials unfinished)")
    table = trials_table(results, tcfg, keys)
    ok = table[table.status != "ERROR"].dropna(subset=["objective"])
    if ok.empty:
        raise RuntimeError(f"tune: every trial of sweep {name} failed; see {path}")
    # a trial ASHA stopped early is compared at a smaller budget: completed ones first
    ok = ok.assign(completed=ok.status == "COMPLETED")
    best = ok.sort_values(["completed", "objective"], ascending=False).iloc[0]
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
    remove_storage(path)  # outputs are written: the resume state is no longer needed
    return summary


def _unfinished(results) -> list[str]:
    """Trials neither terminated nor errored (Tune's trial states, from its analysis)."""
    analysis = getattr(results, "_experiment_analysis", None)
    trials = getattr(analysis, "trials", None) or []
    return [t.trial_id for t in trials if t.status not in ("TERMINATED", "ERROR")]


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
    if params.data.task == "semantic" and params.tune.metric in (
        "val_oiou",
        "val_map",
        "src_val_oiou",
    ):
        raise ParamsError(
            f"tune.metric: {params.tune.metric} is a referring metric; the semantic task "
            "reports val_miou / src_val_miou (and the unsup_* criteria)"
        )
    if params.tune.metric == "unsup_agreement" and not issubclass(
        METHODS[params.adapt.method], MeanTeacherMethod | SDA
    ):
        raise ParamsError(
            f"tune.metric: unsup_agreement needs a mean teacher; {params.adapt.method} has none"
        )
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
