"""Stage ``compare`` (``compare/dvc.yaml``, on demand): every method x task x seed of
``params.yaml: compare``, next to the source-only floor and the oracle ceiling.

The comparison is a small DAG of units, each one an ``adaseg`` stage command run as its own
process (exactly what a user would type), with its own params file under ``--work``:

    seed S:            prepare
    seed S, task T:    pretrain (the floor), oracle (the ceiling)
    seed S, referring: semantics -> init -> masks      (only when SDA is compared)
    seed S, task T, M: adapt (method M; SDA from init, every other method from pretrain)
    seed S, task T:    evaluate (every model of S, T) -> eval.json

Units whose inputs are ready run concurrently, up to ``compare.max_concurrent`` (default: the
Ray cluster's CPUs, or this machine's, divided by ``compare.cpus_per_run``). On a cluster
(``RAY_ADDRESS``) every unit's training runs on the cluster's workers; on a 2-core laptop
(``cpus_per_run: 2``) they run one at a time. A unit is reused, not re-run, when its stamp
(its command, params, upstream stamps and the code) is unchanged: adding a method or a seed
runs only what is new.

Every unit's MLflow run carries ``adaseg.compare`` (this comparison's id), ``adaseg.task``,
``adaseg.seed`` and, for adapt, ``adaseg.method``: ``adaseg report
--from-mlflow <id>`` rebuilds the tables from MLflow alone.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import yaml

from components.adaptation.configs import METHOD_CONFIGS
from components.adaptation.registry import METHODS
from components.comparison import Record, records_from_eval, write_report
from components.config import Params, _flatten_space
from components.io import atomic_path, code_fingerprint, write_json
from components.runtime import ray_address
from components.tracking import TAGS_ENV, stage_run
from pipelines.common import repo_root

log = logging.getLogger(__name__)


@dataclass
class Unit:
    """One stage command of the comparison."""

    name: str  # e.g. seed0/semantic/adapt-dacs
    command: list[str]  # the adaseg sub-command and its options
    params: dict  # the raw params it runs with (written next to its logs)
    outs: list[Path]
    deps: list[str] = field(default_factory=list)  # names of units it needs
    tags: dict = field(default_factory=dict)  # MLflow tags of its run
    seed: int = 0
    task: str = ""


#: sections that never change a unit's results: left out of its stamp
NOT_STAMPED = ("runtime", "tune", "compare")


def unit_params(
    raw: dict, seed: int, task: str, method: str, sections: dict, cpus: int | None = None
) -> dict:
    """``raw`` params for one unit: its seed and task, ``method`` with only its section;
    ``cpus``: the CPUs its training may take (``runtime.train_cpus``), when units share."""
    out = copy.deepcopy(raw)
    if cpus:
        out["runtime"]["train_cpus"] = cpus
        if not (os.environ.get("RAY_ADDRESS") or raw["runtime"].get("ray_address")):
            out["runtime"]["num_cpus"] = cpus  # its own local Ray instance
    out["seed"] = seed
    out["data"]["task"] = task
    adapt = {k: v for k, v in out["adapt"].items() if k not in METHOD_CONFIGS}
    adapt["method"] = method
    adapt[method] = copy.deepcopy(sections.get(method) or {})
    out["adapt"] = adapt
    # the comparison does not sweep: keep the tune space's entries this method accepts
    space = _flatten_space(out.get("tune", {}).get("space") or {})
    ok = {
        k: v
        for k, v in space.items()
        if not k.startswith("adapt.") or k.count(".") == 1 or k.startswith(f"adapt.{method}.")
    }
    out.setdefault("tune", {})["space"] = ok or {"adapt.lr": {"values": [3e-5, 1e-4, 3e-4]}}
    splits = out["evaluate"].get("splits") or []
    if "target_test" not in splits:
        out["evaluate"]["splits"] = [*splits, "target_test"]
    return out


def plan(params: Params, raw: dict, work: Path, workers: int = 1) -> list[Unit]:
    """Every unit of the comparison, in an order that respects their dependencies; with
    ``workers`` > 1 units at once, each unit's training takes ``compare.cpus_per_run`` CPUs."""
    cmp = params.compare
    cpus = cmp.cpus_per_run if workers > 1 else None
    raw = copy.deepcopy(raw)
    sections = {m: raw["adapt"].get(m) or {} for m in METHOD_CONFIGS} | cmp.sections

    def unit_params_of(seed, task, method):
        return unit_params(raw, seed, task, method, sections, cpus)

    units: list[Unit] = []
    methods = [m for m in cmp.methods if m in METHODS]

    def add(name, command, p, outs, deps=(), tags=None, seed=0, task=""):
        units.append(Unit(name, command, p, outs, list(deps), tags or {}, seed, task))

    for seed in cmp.seeds:
        s_dir = work / f"seed{seed}"
        data = s_dir / "data"
        base = unit_params_of(seed, "referring", "source_only")
        add(f"seed{seed}/prepare", ["prepare", "--out", str(data)], base, [data],
            tags={"adaseg.seed": seed}, seed=seed)  # fmt: skip
        for task in cmp.tasks:
            t_dir, key = s_dir / task, f"seed{seed}/{task}"
            # adaseg.task on every unit (adapt also sets it itself); compare_task kept for
            # the runs of earlier comparisons
            tags = {"adaseg.task": task, "adaseg.compare_task": task, "adaseg.seed": seed}
            base_t = unit_params_of(seed, task, "source_only")
            models = t_dir / "models"
            for phase in ("pretrain", "oracle"):
                cmd = [phase, "--data", str(data), "--out", str(models / _model(phase))]
                cmd += ["--metrics", str(t_dir / f"metrics/{phase}.json")]
                cmd += ["--plots", str(t_dir / f"plots/{phase}.csv")]
                outs, deps = [models / _model(phase)], [f"seed{seed}/prepare"]
                add(f"{key}/{phase}", cmd, base_t, outs, deps, tags, seed, task)
            runs = [m for m in methods if task in METHOD_CONFIGS[m].TASKS]
            if "sda" in runs:
                sda = unit_params_of(seed, task, "sda")
                stage1 = str(models / "source_only")
                for stage, extra, out in (
                    ("semantics", ["--model", stage1], t_dir / "semantics"),
                    ("init", ["--base", stage1, "--semantics", str(t_dir / "semantics")],
                     models / "init"),
                    ("masks", ["--base", stage1, "--semantics", str(t_dir / "semantics")],
                     t_dir / "masks"),
                ):  # fmt: skip
                    cmd = [stage, "--data", str(data), *extra, "--out", str(out)]
                    cmd += ["--metrics", str(t_dir / f"metrics/{stage}.json")]
                    if stage == "init":
                        cmd += ["--plots", str(t_dir / "plots/init.csv")]
                    deps = {"semantics": [f"{key}/pretrain"], "init": [f"{key}/semantics"],
                            "masks": [f"{key}/semantics"]}[stage]  # fmt: skip
                    add(f"{key}/{stage}", cmd, sda, [out], deps, tags, seed, task)
            for method in runs:
                p = unit_params_of(seed, task, method)
                start = "init" if method == "sda" else "source_only"
                cmd = ["adapt", "--data", str(data), "--init", str(models / start)]
                cmd += ["--out", str(models / _model(method))]
                cmd += ["--metrics", str(t_dir / f"metrics/adapt_{method}.json")]
                cmd += ["--plots", str(t_dir / f"plots/adapt_{method}.csv")]
                deps = [f"{key}/pretrain"]
                if "semantics" in METHODS[method].requires:
                    cmd += [
                        "--semantics",
                        str(t_dir / "semantics"),
                        "--masks",
                        str(t_dir / "masks"),
                    ]
                    deps = [f"{key}/init", f"{key}/masks"]
                add(f"{key}/adapt-{method}", cmd, p, [models / _model(method)], deps,
                    {**tags, "adaseg.method": method}, seed, task)  # fmt: skip
            model_dirs = [models / _model(m) for m in ("pretrain", *runs, "oracle")]
            cmd = ["evaluate", "--data", str(data), "--models", *map(str, model_dirs)]
            cmd += ["--metrics", str(t_dir / "eval.json")]
            cmd += ["--predictions", str(t_dir / "predictions")]
            cmd += ["--overlays", str(t_dir / "overlays")]
            deps = [f"{key}/pretrain", f"{key}/oracle", *(f"{key}/adapt-{m}" for m in runs)]
            add(f"{key}/evaluate", cmd, base_t, [t_dir / "eval.json"], deps, tags, seed, task)
    return units


def _model(name: str) -> str:
    """Model folder name: the stage-1 model is the floor ``source_only``; the method
    ``source_only`` (same budget, source only) is ``source_only_adapt``."""
    return {"pretrain": "source_only", "oracle": "oracle", "source_only": "source_only_adapt"}.get(
        name, name
    )


def _stamp(unit: Unit, dep_stamps: list[str], code: str) -> str:
    stamped = {k: v for k, v in unit.params.items() if k not in NOT_STAMPED}
    blob = json.dumps([unit.command, stamped, dep_stamps, code], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def concurrency(params: Params) -> int:
    """``compare.max_concurrent``, or the CPUs Ray sees (a cluster's; locally
    ``runtime.num_cpus`` or this machine's), divided by ``compare.cpus_per_run``."""
    cmp = params.compare
    if cmp.max_concurrent:
        return cmp.max_concurrent
    cpus = params.runtime.num_cpus or os.cpu_count() or 1
    if ray_address(params.runtime):
        import ray

        from components.runtime import init_ray

        init_ray(params.runtime)
        cpus = int(ray.cluster_resources().get("CPU", cpus))
    return max(1, cpus // cmp.cpus_per_run)


def execute(units: list[Unit], work: Path, workers: int, compare_id: str) -> dict[str, str]:
    """Run ``units`` (dependencies first, up to ``workers`` at once); returns their stamps.

    Raises:
        RuntimeError: naming the first unit that failed and its log; the units already
            finished keep their stamps, so a re-run resumes after them.
    """
    code = code_fingerprint()  # a unit re-runs when the code that runs it changed
    stamps: dict[str, str] = {}
    by_name = {u.name: u for u in units}
    stamp_dir, log_dir, params_dir = work / ".stamps", work / "logs", work / "params"
    for d in (stamp_dir, log_dir, params_dir):
        d.mkdir(parents=True, exist_ok=True)
    pending, running, failed = list(units), {}, None

    def launch(unit: Unit, stamp: str) -> str:
        log.info("compare: running %s", unit.name)
        flat = unit.name.replace("/", "__")
        pfile = params_dir / f"{flat}.yaml"
        pfile.write_text(yaml.safe_dump(unit.params, sort_keys=False))
        env = dict(os.environ)
        env["ADASEG_PIPELINE_ID"] = compare_id
        tags = {"adaseg.compare": compare_id, **unit.tags}
        env[TAGS_ENV] = json.dumps({k: str(v) for k, v in tags.items()})
        env.pop("MLFLOW_RUN_ID", None)
        cmd = [sys.executable, "-m", "pipelines.cli", "--params", str(pfile), *unit.command]
        t0 = time.time()
        with open(log_dir / f"{flat}.log", "w") as fh:
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"compare: unit {unit.name} failed; see {log_dir / flat}.log")
        seconds = time.time() - t0
        log.info("compare: %s done in %.0f s", unit.name, seconds)
        # start / seconds: when and how long it ran (the benchmarks read them)
        done = {"stamp": stamp, "start": round(t0, 1), "seconds": round(seconds, 1)}
        (stamp_dir / f"{flat}.json").write_text(json.dumps(done))
        return stamp

    with ThreadPoolExecutor(max_workers=workers) as pool:
        while pending or running:
            for unit in list(pending):
                if failed or not all(d in stamps for d in unit.deps):
                    continue
                pending.remove(unit)
                stamp = _stamp(unit, [stamps[d] for d in unit.deps], code)
                done = stamp_dir / f"{unit.name.replace('/', '__')}.json"
                if (
                    done.is_file()
                    and json.loads(done.read_text()).get("stamp") == stamp
                    and all(p.exists() for p in unit.outs)
                ):
                    stamps[unit.name] = stamp  # reused
                    log.info("compare: %s up to date", unit.name)
                    continue
                running[pool.submit(launch, unit, stamp)] = unit.name
            if not running:
                if pending and not failed:
                    stuck = [u.name for u in pending]
                    raise RuntimeError(f"compare: unsatisfiable dependencies: {stuck}")
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                name = running.pop(fut)
                try:
                    stamps[name] = fut.result()
                except RuntimeError as err:
                    failed = failed or err
    if failed:
        raise failed
    missing = [n for n in by_name if n not in stamps]
    if missing:
        raise RuntimeError(f"compare: units not run: {missing}")
    return stamps


def collect(units: list[Unit]) -> list[Record]:
    """Records of every evaluate unit's ``eval.json``."""
    records: list[Record] = []
    for unit in units:
        if unit.command[0] == "evaluate":
            results = json.loads(unit.outs[0].read_text())
            records += records_from_eval(results, unit.task, unit.seed)
    return records


def compare_id(work: Path) -> str:
    """The comparison's id: one per work folder, so units reused from an earlier invocation
    (their MLflow runs made then) belong to the same comparison."""
    return "compare-" + hashlib.sha256(str(work.resolve()).encode()).hexdigest()[:12]


def run(params: Params, raw: dict, work: Path, out: Path) -> tuple[dict, list[Unit]]:
    workers = concurrency(params)
    units = plan(params, raw, work, workers)
    compare_id_ = compare_id(work)
    mlflow.set_tag("adaseg.compare", compare_id_)
    log.info("compare %s: %d units, up to %d at once", compare_id_, len(units), workers)
    execute(units, work, workers, compare_id_)
    records = collect(units)
    with atomic_path(out, is_dir=True) as tmp:
        metrics = write_report(records, tmp)
    return metrics, units


def main(params: Params, work: str, out: str, metrics: str) -> None:
    # the validated params, -S overrides included, as the units' starting point
    raw = params.model_dump(mode="json", exclude_none=True)
    used = {"compare": params.compare.model_dump(mode="json")}
    with stage_run("compare", params.runtime, used, repo_root()):
        summary, _ = run(params, raw, Path(work), Path(out))
        write_json(metrics, summary)
        mlflow.log_artifacts(out, artifact_path="compare")
    log.info("compare: report in %s", out)
