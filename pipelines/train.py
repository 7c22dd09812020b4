"""Stages ``pretrain`` (SDA stage 1: L_seg on the labeled source) and ``oracle`` (the same network
trained with target labels: the upper bound), both through Ray Train (``pipelines.ray_train``).

The driver loads the splits once and puts them in Ray's object store; every worker trains on its
slice of the data; rank 0 validates after each epoch. An interrupted run resumes after its last
finished epoch when the stage is re-run.
"""

from __future__ import annotations

import csv
import logging
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
import ray

from components.config import ModelConfig, Params, TrainConfig
from components.data.dataset import load_split
from components.data.schema import shard_paths
from components.data.vocab import Vocab
from components.io import atomic_path, write_json
from components.models.network import _unwrap, build_model, save_trained
from components.models.text import load_glove
from components.plots import training_curves
from components.runtime import init_ray
from components.tracking import log_history, stage_run
from components.training import train_epoch, val_metrics
from pipelines import ray_train
from pipelines.common import repo_root

log = logging.getLogger(__name__)

#: phase -> the domain whose labels it trains on
PHASES = {"pretrain": "source", "oracle": "target"}


def setup_supervised(config: dict) -> ray_train.Phase:
    """Worker side: the base network trained with L_seg (Eq. 10) on one domain's labels."""
    tcfg = TrainConfig.model_validate(config["train"])
    mcfg = ModelConfig.model_validate(config["model"])
    train, val = ray.get(config["train_ref"]), ray.get(config["val_ref"])
    model = build_model(mcfg, config["vocab_size"], config.get("embeddings"))
    w = ray_train.prepare_worker(config, model, len(train), tcfg)
    model, device, rank, world, indices = w.model, w.device, w.rank, w.world, w.indices
    steps, opt, sched = w.steps, w.optimizer, w.scheduler

    def run_epoch(epoch: int, tick) -> dict:
        rng = np.random.default_rng((config["seed"], rank, epoch))
        t0 = time.perf_counter()
        stats = train_epoch(
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
        return val_metrics(_unwrap(model), val, device, mcfg.empty_threshold)

    return ray_train.Phase(
        epochs=tcfg.epochs,
        modules={"model": model},
        optimizers={"optimizer": opt, "scheduler": sched},
        train_epoch=run_epoch,
        validate=validate,
        steps_per_epoch=steps,
    )


def run(params: Params, phase: str, data_dir: Path, out_dir: Path) -> list[dict]:
    """Train ``phase`` on its domain's train split; write the model to ``out_dir`` atomically.

    Returns the per-epoch history (loss, lr, samples_per_s, seconds, val_oiou/miou/map).
    """
    domain = PHASES[phase]
    tcfg: TrainConfig = getattr(params, phase)
    mcfg = params.model
    vocab = Vocab.load(data_dir / "vocab.json")
    train = load_split(data_dir, domain, "train", vocab, mcfg.max_words, mcfg.num_superpixels)
    val = load_split(data_dir, domain, "val", vocab, mcfg.max_words, mcfg.num_superpixels)
    embeddings = None
    if mcfg.embeddings == "glove":
        embeddings = load_glove(mcfg.glove_path, vocab, mcfg.embed_dim, params.seed)
    init_ray(params.runtime)
    state = ray_train.fit(
        params,
        phase,
        tcfg,
        setup_supervised,
        {
            "train": tcfg.model_dump(mode="json"),
            "model": mcfg.model_dump(mode="json"),
            "vocab_size": len(vocab),
            "embeddings": embeddings,
            "train_ref": ray.put(train),
            "val_ref": ray.put(val),
        },
        inputs=[*shard_paths(data_dir, domain, "train"), data_dir / "vocab.json"],
    )
    model = build_model(mcfg, len(vocab))
    model.load_state_dict(state["modules"]["model"])
    history = state["history"]
    meta = {"phase": phase, "domain": domain, "epochs": tcfg.epochs, "seed": params.seed}
    with atomic_path(out_dir, is_dir=True) as tmp:
        save_trained(tmp, model, mcfg, len(vocab), meta)
        write_history(history, tmp / "history.csv")
    ray_train.finish(state)
    return history


def write_history(history: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)


def log_stage(phase: str, history: list[dict], metrics: str, plots: str, out: str, title: str):
    """Shared tail of every training stage: DVC metrics / plots and MLflow artefacts."""
    log_history(history)
    final = history[-1]
    skip = ("lr", "samples_per_s", "seconds")
    write_json(metrics, {k: v for k, v in final.items() if k not in skip})
    with atomic_path(plots) as tmp:
        write_history(history, tmp)
    with tempfile.TemporaryDirectory() as d:
        training_curves(history, Path(d) / "curves.png", title)
        mlflow.log_artifact(str(Path(d) / "curves.png"))
    mlflow.log_artifacts(out, artifact_path="model")
    log.info("%s done: %s", phase, {k: round(v, 4) for k, v in final.items()})


def main(params: Params, phase: str, data: str, out: str, metrics: str, plots: str) -> None:
    used = {
        "seed": params.seed,
        "model": params.model.model_dump(mode="json"),
        phase: getattr(params, phase).model_dump(mode="json"),
    }
    with stage_run(phase, params.runtime, used, repo_root()):
        history = run(params, phase, Path(data), Path(out))
        log_stage(phase, history, metrics, plots, out, f"{phase} ({PHASES[phase]} labels)")
