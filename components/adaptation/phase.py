"""The adaptation phase, whatever the method: what a Ray Train worker (stage ``adapt``) and a
Ray Tune trial (``pipelines.tune``) run.

Each step draws a labeled source batch and an unlabeled target batch, asks the method for its
loss, steps the optimizer over ``method.trainable()`` and lets the method update its state.
Target ground truth never reaches a method: the target training split's masks are replaced by
the ``masks`` stage's semantic-based masks when the method requires them, by empty masks
otherwise, and its semantic maps are dropped. Only the per-epoch validation reads the labeled
target val split (reporting and the sweep objective).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import ray
import torch

from components import train_loop
from components.adaptation.base import AdaptationMethod, Upstream
from components.adaptation.registry import METHODS
from components.config import Params, ParamsError
from components.data.dataset import SplitArrays, iterate_batches, to_batch
from components.data.vocab import Vocab
from components.selection import selection_metrics
from components.stage_io import load_labels, load_masks, load_task_split, task_of
from components.tasks import Task
from components.training import autocast, make_optimizer


@dataclass(frozen=True)
class AdaptInputs:
    """What the adaptation workers read."""

    task: Task
    vocab_size: int
    init_state: dict  # weights of the network adaptation starts from
    upstream: Upstream
    source_ref: ray.ObjectRef  # labeled source train split
    target_ref: ray.ObjectRef  # target train split without its ground truth
    val_ref: ray.ObjectRef  # labeled target val split (reporting only)
    # labeled source val split: when given, every epoch also reports the label-free model
    # selection criteria (components.selection); sweeps always give it
    source_val_ref: ray.ObjectRef | None = None


def build_method(params: Params, inp: AdaptInputs) -> AdaptationMethod:
    """``params.adapt.method`` around the network of ``inp.init_state``."""
    network = inp.task.build_network(inp.vocab_size)
    network.load_state_dict(inp.init_state)
    cls = METHODS[params.adapt.method]
    return cls(network, params.adapt.method_config, inp.task, inp.upstream)


def step_batch(
    task: Task,
    upstream: Upstream,
    data: SplitArrays,
    domain: str,
    rows: np.ndarray,
    device,
    rng: np.random.Generator,
) -> dict:
    """The ``domain`` batch of ``rows`` one adaptation step sees: the task's tensors, the
    upstream fields and, on the labeled source side, what only supervised training feeds the
    network (``Task.training_inputs``: DMMI's erased words, so that its auxiliary losses join
    the source loss of every method)."""
    fields = upstream.batch_fields(domain, rows)
    out = {**to_batch(data, rows, device), **{k: v.to(device) for k, v in fields.items()}}
    if domain == "source":
        out = task.training_inputs(out, data, rows, rng)
    return out


def setup_adapt(spec: train_loop.PhaseSpec) -> train_loop.Phase:
    """The adaptation phase; runs in a Ray Train worker, or in a Ray Tune trial (sweeps)."""
    cfg, inp = spec.params.adapt, spec.payload
    task = inp.task
    rank, world, device = train_loop.worker_info(spec)
    src, tgt, val = (ray.get(r) for r in (inp.source_ref, inp.target_ref, inp.val_ref))
    src_val = ray.get(inp.source_val_ref) if inp.source_val_ref is not None else None
    method = build_method(spec.params, inp).to(device)
    s_idx, t_idx = np.arange(rank, len(src), world), np.arange(rank, len(tgt), world)
    steps = math.ceil(min(len(s_idx), len(t_idx)) / cfg.batch_size)
    trainable = list(method.trainable())
    opt, sched = make_optimizer(trainable, cfg, steps * cfg.epochs)
    gen = torch.Generator().manual_seed(spec.seed)
    # saved with every checkpoint: a resumed run samples pixels / mixes as the original did,
    # and finds the method's state outside its tensors (memory banks) as it was
    extra = {"generator": gen.get_state(), "method": method.extra_state()}

    def batch(data: SplitArrays, domain: str, rows: np.ndarray, rng) -> dict:
        return step_batch(task, inp.upstream, data, domain, rows, device, rng)

    def run_epoch(epoch: int, tick) -> dict:
        gen.set_state(extra["generator"])
        method.load_extra_state(extra["method"])
        method.train()
        rng = np.random.default_rng((spec.seed, rank, epoch))
        t_order = rng.permutation(t_idx)
        sums: dict[str, float] = {}
        n = 0
        for i, bidx in enumerate(iterate_batches(len(s_idx), cfg.batch_size, True, rng)):
            if i >= steps:
                break
            rows_s = s_idx[bidx]
            rows_t = t_order[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            sb, tb = batch(src, "source", rows_s, rng), batch(tgt, "target", rows_t, rng)
            with autocast(device, cfg.amp):
                loss, logs = method.step(sb, tb, gen)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite adaptation loss {loss.item()}: {logs}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            train_loop.average_gradients(trainable, world)
            opt.step()
            sched.step()
            method.after_step()
            for k, v in {"loss": loss.item(), **logs}.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            n += 1
            if tick:
                tick()
        extra["generator"] = gen.get_state()
        extra["method"] = method.extra_state()
        row = {k: v / max(1, n) for k, v in sums.items() if k != "empty_pseudo"}
        if "empty_pseudo" in sums:
            row["empty_pseudo_batches"] = sums["empty_pseudo"]
        return row

    def validate() -> dict:
        # labeled target val (reporting / sweep objective) + criteria that need no labels
        net = method.inference_network()
        row = {
            **task.val_metrics(net, val, device),
            **task.unsupervised_metrics(net, method.teacher_network(), val, device),
        }
        if src_val is not None:  # target val's images only, never its labels
            row.update(selection_metrics(task, net, val, src_val, device, spec.seed))
        return row

    return train_loop.Phase(
        epochs=cfg.epochs,
        modules={"method": method},
        optimizers={"optimizer": opt, "scheduler": sched},
        train_epoch=run_epoch,
        validate=validate,
        steps_per_epoch=steps,
        extra_state=extra,
    )


def load_source_val(params: Params, data_dir: Path, task: Task, vocab: Vocab) -> SplitArrays:
    """The labeled source val split, for the label-free selection criteria (DEV, source-val
    metrics; see ``AdaptInputs.source_val_ref``)."""
    return load_task_split(params, data_dir, "source", "val", task, vocab)


def required_input(params: Params, what: str, path: Path | None) -> Path:
    """The folder of an upstream output the selected method requires, or a clear error."""
    if path is None:
        raise ParamsError(
            f"adapt.method: {params.adapt.method} requires the {what} stage's output "
            f"(give --{what})"
        )
    return Path(path)


def load_inputs(
    params: Params, data_dir: Path, semantics: Path | None = None, masks: Path | None = None
) -> tuple[Vocab, Task, tuple[SplitArrays, SplitArrays, SplitArrays], Upstream]:
    """Vocab, task, the three splits (target train without ground truth) and the upstream
    outputs the selected method requires."""
    requires = METHODS[params.adapt.method].requires
    task = task_of(params, data_dir)
    vocab = Vocab.load(Path(data_dir) / "vocab.json")
    source, target, val = (
        load_task_split(params, data_dir, d, s, task, vocab)
        for d, s in (("source", "train"), ("target", "train"), ("target", "val"))
    )
    # the target ground truth is replaced before anything trains
    if "masks" in requires:
        semantic_masks = load_masks(required_input(params, "masks", masks), target)
        target = replace(target, masks=semantic_masks, labels=None)
    else:
        target = target.without_masks()
    upstream = Upstream()
    if "semantics" in requires:
        folder = required_input(params, "semantics", semantics)
        src_cat, _ = load_labels(folder, source)
        tgt_cat, tgt_common = load_labels(folder, target)
        upstream = Upstream(src_cat, tgt_cat, tgt_common)
    return vocab, task, (source, target, val), upstream
