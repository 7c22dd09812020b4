"""Running a training phase on Ray Train: the one place that knows about workers, reports,
checkpoints and resume. Every training stage (pretrain, oracle, init, masks, adapt) supplies a
``Phase``: how to build its modules, run one epoch and validate; this module does the rest.

Across the Ray boundary goes one frozen :class:`PhaseSpec`: the validated params, the phase's
set-up function and its typed inputs (``payload``, a frozen dataclass holding ObjectRefs for
the large arrays). Nothing is re-validated on the worker side.

Resume: the run is named after a hash of its inputs, params and code (the ``components`` and
``pipelines`` sources: a checkpoint written by other code is never resumed), so re-running an
interrupted stage finds the run's state in ``runtime.storage_path``; Ray Train hands the last
checkpoint to the new workers (``ray.train.get_checkpoint()``) and training continues after
the last finished epoch. Batch order is seeded by (seed, rank, epoch), so a resumed run sees
the same batches. The same holds when Ray Train itself restarts the workers (a lost node,
``runtime.max_failures``).

Every start of the workers (the first, a restart after a failure, a resume after a killed
driver) is an *attempt*, kept in the checkpoint with the epoch it started after, the Ray
node of every rank and the precision its steps computed in; the stage's MLflow run gets them
as tags (:func:`tag_run`, called by ``tracking.log_stage`` once the outputs are written).
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ray.train import (
    Checkpoint,
    CheckpointConfig,
    FailureConfig,
    LoggingConfig,
    RunConfig,
    ScalingConfig,
)
from ray.train.torch import TorchTrainer

from components.config import Params, ParamsError, TrainConfig
from components.io import code_fingerprint, fingerprint
from components.models.network import _unwrap
from components.runtime import (
    cpus_per_worker,
    init_ray,
    ray_address,
    remove_storage,
    resolve_use_gpu,
    storage_path,
    train_log_level,
)
from components.training import cpu_bf16_native, make_optimizer, precision


@dataclass
class Phase:
    """What a training stage defines; built inside each worker by its ``setup`` function."""

    epochs: int
    modules: dict[str, torch.nn.Module]  # everything saved in the checkpoint
    optimizers: dict[str, object]  # optimizers and schedulers (state_dict-able)
    train_epoch: Callable[[int, Callable[[], None] | None], dict[str, float]]
    validate: Callable[[], dict[str, float]]  # rank 0 only
    steps_per_epoch: int = 1
    extra_state: dict = field(default_factory=dict)  # e.g. memory banks, saved as tensors


@dataclass(frozen=True)
class PhaseSpec:
    """Everything a worker needs to build and run a phase; pickled once to every worker."""

    phase: str  # the stage's name: pretrain, oracle, init, masks, adapt
    setup: Callable[[PhaseSpec], Phase]  # builds the phase inside the worker
    params: Params  # validated on the driver, frozen
    payload: Any  # the phase's typed inputs (a frozen dataclass)
    threads: int = 1  # torch threads per worker
    progress: bool = False  # live progress bar (a terminal)
    standalone: bool = False  # a Ray Tune trial or a test: no Ray Train context
    use_gpu: bool = False  # standalone only; Ray Train workers get their device from Ray

    @property
    def seed(self) -> int:
        return self.params.seed

    def train_config(self) -> TrainConfig:
        """The phase's params section (``params.<phase>``)."""
        return getattr(self.params, self.phase)


def worker_info(spec: PhaseSpec) -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this process: a Ray Train worker, or a standalone
    process such as a Ray Tune trial (``spec.standalone``)."""
    if spec.standalone:
        cuda = spec.use_gpu and torch.cuda.is_available()
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device()


@dataclass
class Worker:
    """What every phase's ``setup`` needs about its process, from :func:`prepare_worker`."""

    rank: int
    world: int
    device: torch.device
    model: torch.nn.Module  # moved to the device; wrapped in DDP when world > 1
    indices: np.ndarray  # this rank's rows of the training split
    steps: int  # optimizer steps per epoch
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler


def prepare_worker(spec: PhaseSpec, model: torch.nn.Module, rows: int, tcfg: TrainConfig) -> Worker:
    """Place ``model``, shard ``rows`` training rows over the ranks and build the optimizer
    (warm-up then linear decay over ``tcfg.epochs``)."""
    rank, world, device = worker_info(spec)
    if spec.standalone:
        model = model.to(device)
    else:
        import ray.train.torch

        model = ray.train.torch.prepare_model(model)
    indices = np.arange(rank, rows, world)
    steps = math.ceil(len(indices) / tcfg.batch_size)
    opt, sched = make_optimizer(model, tcfg, steps * tcfg.epochs)
    return Worker(rank, world, device, model, indices, steps, opt, sched)


def average_gradients(params, world: int) -> None:
    """All-reduce (mean) the gradients of ``params`` across Ray Train workers, for phases whose
    modules are not wrapped in DDP (e.g. a method holding a student and a teacher)."""
    if world > 1:
        import torch.distributed as dist

        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= world


def worker_loop(config: dict) -> None:
    """The Ray Train worker: builds the phase, resumes, trains, reports a checkpoint per epoch."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    run_phase(config["spec"], rank, ray.train.get_checkpoint, ray.train.report, Checkpoint)


def placement(world: int) -> list[str]:
    """The Ray node id of every rank's process, in rank order (all ranks must call it)."""
    import ray

    me = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
    if world == 1:
        return [me]
    import torch.distributed as dist

    nodes: list = [None] * world
    dist.all_gather_object(nodes, me)
    return nodes


def run_phase(
    spec: PhaseSpec, rank: int, get_checkpoint, report, checkpoint_cls, report_last=False
) -> None:
    """Resume from ``get_checkpoint()``, then train; ``report(row, checkpoint=...)`` per epoch.

    ``ray.train``'s functions and ``Checkpoint`` inside a Train worker, ``ray.tune``'s inside
    a Tune trial. ``report_last``: after resuming, report the checkpoint's last epoch row
    again first (the caller resumed from a checkpoint newer than its tracker has seen).
    """
    from ray.experimental.tqdm_ray import tqdm

    torch.set_num_threads(spec.threads)
    torch.manual_seed(spec.seed)  # identical initial weights on every rank
    phase: Phase = spec.setup(spec)
    name = spec.phase
    start, history, attempts = 0, [], []
    checkpoint = get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=True)
        for key, module in phase.modules.items():
            _unwrap(module).load_state_dict(state["modules"][key])
        for key, opt in phase.optimizers.items():
            opt.load_state_dict(state["optimizers"][key])
        phase.extra_state.update(state.get("extra", {}))
        start, history = state["epoch"], state["history"]
        attempts = state.get("attempts", [])
        if rank == 0:
            print(f"[{name}] resuming after epoch {start}/{phase.epochs}", flush=True)
            if report_last and history:
                report(history[-1])

    _, world, device = worker_info(spec)
    attempts = [
        *attempts,
        {
            "after_epoch": start,
            "nodes": placement(world),
            "precision": precision(device, spec.train_config().amp),
        },
    ]
    for epoch in range(start, phase.epochs):
        desc = f"{name} epoch {epoch + 1}/{phase.epochs}"
        # a live bar on a terminal; one line per epoch in logs (DVC, CI) that cannot redraw
        bar = tqdm(total=phase.steps_per_epoch, desc=desc) if rank == 0 and spec.progress else None
        t0 = time.perf_counter()
        row = {
            "epoch": epoch + 1,
            **phase.train_epoch(epoch, (lambda b=bar: b.update(1)) if bar else None),
        }
        row["seconds"] = time.perf_counter() - t0
        if bar:
            bar.close()
        with tempfile.TemporaryDirectory() as d:
            ckpt = None
            if rank == 0:
                t0 = time.perf_counter()
                row.update(phase.validate())
                row["val_seconds"] = time.perf_counter() - t0
                history.append(row)
                print(
                    f"{desc}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "epoch"),
                    flush=True,
                )
                torch.save(
                    {
                        "modules": {k: _unwrap(m).state_dict() for k, m in phase.modules.items()},
                        "optimizers": {k: o.state_dict() for k, o in phase.optimizers.items()},
                        "extra": phase.extra_state,
                        "epoch": epoch + 1,
                        "history": history,
                        "attempts": attempts,
                    },
                    Path(d) / "state.pt",
                )
                ckpt = checkpoint_cls.from_directory(d)
            report(row, checkpoint=ckpt)


def fit(
    params: Params,
    phase: str,
    tcfg: TrainConfig,
    setup: Callable[[PhaseSpec], Phase],
    payload: Any,
    inputs: list[Path],
) -> dict:
    """Run ``setup``'s phase on Ray Train; returns the final checkpoint's state.

    ``payload`` reaches ``setup`` in every worker as ``spec.payload`` (hold large arrays in it
    as ObjectRefs); ``inputs`` (files) and the params name the run for resume.
    """
    root = Path.cwd()  # DVC runs stages from the repository root
    init_ray(params.runtime)
    use_gpu = resolve_use_gpu(tcfg.use_gpu)
    if (
        tcfg.amp is True
        and not use_gpu
        and ray_address(params.runtime) is None
        and not cpu_bf16_native()
    ):
        raise ParamsError(
            f"{phase}.amp: true trains in bfloat16 on this CPU, which has no native bfloat16 "
            "(AVX512-BF16 / AMX): emulated, it runs about ten times slower than float32; "
            f"set {phase}.amp: false here"
        )
    threads = 1 if use_gpu else cpus_per_worker(tcfg.num_workers, params.runtime.train_cpus)
    name = f"{phase}-" + fingerprint(
        inputs,
        {
            "phase": phase,
            "params": params.model_dump(mode="json", exclude={"runtime"}),
            "code": code_fingerprint(),
        },
    )
    storage = storage_path(params.runtime, root)
    spec = PhaseSpec(phase, setup, params, payload, threads, progress=sys.stderr.isatty())
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={"spec": spec},
        scaling_config=ScalingConfig(
            num_workers=tcfg.num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": 1 if use_gpu else threads},
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=params.runtime.max_failures),
            logging_config=LoggingConfig(log_level=train_log_level()),
        ),
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as d:
        state = torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=True)
    state["_storage"] = f"{storage.rstrip('/')}/{name}"
    return state


def tag_run(state: dict) -> None:
    """Where the phase trained, on the stage's MLflow run (when one is active):
    ``adaseg.train_nodes`` (the Ray node ids its workers ran on), ``adaseg.train_restarts``
    (attempts after the first: restarts after a failure and resumes after a killed driver),
    ``adaseg.train_attempts`` (JSON: per attempt, the epoch it started after and each rank's
    node), ``adaseg.train_precision`` (what the training steps computed in: bfloat16 or
    float32, per the phase's ``amp`` on its workers' devices) and ``adaseg.ray_storage`` (the
    run's checkpoint folder or URI)."""
    import json

    import mlflow

    if mlflow.active_run() is None:
        return
    attempts = state.get("attempts", [])
    nodes = sorted({n for a in attempts for n in a["nodes"]})
    mlflow.set_tags(
        {
            "adaseg.train_nodes": ",".join(nodes),
            "adaseg.train_restarts": max(len(attempts) - 1, 0),
            "adaseg.train_attempts": json.dumps(attempts),
            "adaseg.train_precision": ",".join(
                sorted({a["precision"] for a in attempts if "precision" in a})
            ),
            "adaseg.ray_storage": state["_storage"],
        }
    )


def standalone(spec: PhaseSpec, threads: int, use_gpu: bool = False) -> PhaseSpec:
    """``spec`` for a process without a Ray Train context (a Tune trial, a test)."""
    return replace(spec, threads=threads, progress=False, standalone=True, use_gpu=use_gpu)


def finish(state: dict) -> None:
    """Call once the stage's outputs are written and tracked (``tracking.log_stage``): the
    resume state is no longer needed."""
    remove_storage(state["_storage"])
