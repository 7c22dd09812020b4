"""Stages ``pretrain`` (SDA stage 1: L_seg on the labeled source) and ``oracle`` (the same network
trained with target labels: the upper bound), both through Ray Train (``pipelines.ray_train``).

The driver loads the splits once and puts them in Ray's object store; every worker trains on its
slice of the data; rank 0 validates after each epoch. An interrupted run resumes after its last
finished epoch when the stage is re-run.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
import torch

from components import train_loop
from components.config import Params
from components.data.schema import read_shards, shard_paths
from components.data.vocab import Vocab
from components.io import atomic_path
from components.models.network import _unwrap, save_trained
from components.models.text import (
    contextual_subtokens,
    fit_cooccurrence,
    load_glove,
    load_transformer_embeddings,
)
from components.models.visual import imagenet_state, load_backbone
from components.runtime import init_ray
from components.stage_io import load_task_split, task_of, write_history
from components.tasks import Task
from components.tracking import log_stage, stage_run
from components.training import train_epoch
from pipelines.common import repo_root

log = logging.getLogger(__name__)

#: phase -> the domain whose labels it trains on
PHASES = {"pretrain": "source", "oracle": "target"}


@dataclass(frozen=True)
class SupervisedInputs:
    """What a supervised phase's workers read."""

    task: Task
    vocab_size: int
    embeddings: torch.Tensor | None
    train_ref: ray.ObjectRef  # SplitArrays of the domain's train split
    val_ref: ray.ObjectRef  # ... and its val split
    # ImageNet weights of a resnet backbone, read and checked on the driver (so the workers
    # of a cluster need no copy of the file); None for the convnet or a random init
    backbone_ref: ray.ObjectRef | None = None


def setup_supervised(spec: train_loop.PhaseSpec) -> train_loop.Phase:
    """Worker side: the task's base network trained with its supervised loss (referring:
    L_seg, Eq. 10) on one domain's labels."""
    tcfg, inp = spec.train_config(), spec.payload
    task = inp.task
    train, val = ray.get(inp.train_ref), ray.get(inp.val_ref)
    model = task.build_network(inp.vocab_size, inp.embeddings)
    if inp.backbone_ref is not None:
        load_backbone(model, ray.get(inp.backbone_ref))
    w = train_loop.prepare_worker(spec, model, len(train), tcfg)
    model, device, rank, world, indices = w.model, w.device, w.rank, w.world, w.indices
    steps, opt, sched = w.steps, w.optimizer, w.scheduler

    def run_epoch(epoch: int, tick) -> dict:
        rng = np.random.default_rng((spec.seed, rank, epoch))
        t0 = time.perf_counter()
        stats = train_epoch(
            task,
            model,
            opt,
            sched,
            train,
            indices,
            tcfg.batch_size,
            device,
            rng,
            tcfg.amp,
            on_batch=(lambda _loss: tick()) if tick else None,
        )
        seconds = time.perf_counter() - t0
        return {
            "loss": stats["loss"],
            "lr": sched.get_last_lr()[0],
            "samples_per_s": stats["samples"] * world / seconds,
        }

    def validate() -> dict:
        return task.val_metrics(_unwrap(model), val, device)

    return train_loop.Phase(
        epochs=tcfg.epochs,
        modules={"model": model},
        optimizers={"optimizer": opt, "scheduler": sched},
        train_epoch=run_epoch,
        validate=validate,
        steps_per_epoch=steps,
    )


def run(params: Params, phase: str, data_dir: Path, out_dir: Path) -> dict:
    """Train ``phase`` on its domain's train split; write the model to ``out_dir`` atomically.

    Returns the final training state (its ``history``: per epoch loss, lr, samples_per_s,
    seconds, val_oiou/miou/map); ``tracking.log_stage`` records it and drops the checkpoint.
    """
    domain = PHASES[phase]
    tcfg = getattr(params, phase)
    mcfg = params.model
    backbone = imagenet_state(mcfg)  # first: a missing weights file fails at once
    task = task_of(params, data_dir)
    vocab = Vocab.load(data_dir / "vocab.json")
    train = load_task_split(params, data_dir, domain, "train", task, vocab)
    val = load_task_split(params, data_dir, domain, "val", task, vocab)
    embeddings = None
    if mcfg.text_encoder == "contextual" and task.name == "referring":
        embeddings = contextual_subtokens(mcfg.text_model_path, vocab, mcfg.embed_dim)
    elif mcfg.embeddings == "glove" and task.name == "referring":
        embeddings = load_glove(mcfg.glove_path, vocab, mcfg.embed_dim, params.seed)
    elif mcfg.embeddings == "transformer" and task.name == "referring":
        embeddings = load_transformer_embeddings(mcfg.text_model_path, vocab, mcfg.embed_dim)
    elif mcfg.embeddings == "cooccurrence" and task.name == "referring":
        texts = [  # both domains' training queries: no labels, and the vocabulary's source
            q
            for d in ("source", "target")
            for q in read_shards(shard_paths(data_dir, d, "train"), ["query"])
            .column("query")
            .to_pylist()
        ]
        embeddings = fit_cooccurrence(texts, vocab, mcfg.embed_dim, seed=params.seed)
    init_ray(params.runtime)
    inputs = SupervisedInputs(
        task,
        len(vocab),
        embeddings,
        ray.put(train),
        ray.put(val),
        None if backbone is None else ray.put(backbone),
    )
    state = train_loop.fit(
        params,
        phase,
        tcfg,
        setup_supervised,
        inputs,
        inputs=[*shard_paths(data_dir, domain, "train"), data_dir / "vocab.json"],
    )
    model = task.build_network(len(vocab))
    model.load_state_dict(state["modules"]["model"])
    history = state["history"]
    meta = {"phase": phase, "domain": domain, "epochs": tcfg.epochs, "seed": params.seed}
    with atomic_path(out_dir, is_dir=True) as tmp:
        save_trained(tmp, model, mcfg, len(vocab), meta, task)
        write_history(history, tmp / "history.csv")
    return state


def main(params: Params, phase: str, data: str, out: str, metrics: str, plots: str) -> None:
    used = {
        "seed": params.seed,
        "model": params.model.model_dump(mode="json"),
        phase: getattr(params, phase).model_dump(mode="json"),
    }
    with stage_run(phase, params.runtime, used, repo_root()):
        state = run(params, phase, Path(data), Path(out))
        title = f"{phase} ({PHASES[phase]} labels, {params.data.task})"
        log_stage(phase, state, metrics, plots, out, title)
