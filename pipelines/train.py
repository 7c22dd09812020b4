"""Stages ``pretrain`` (SDA stage 1: L_seg on the labeled source) and ``oracle`` (the same network
trained with target labels: the upper bound), both through Ray Train.

The driver loads the split once, puts it in Ray's object store and launches a ``TorchTrainer``;
every worker trains on its slice of the data and reports per-epoch metrics with a checkpoint.
The run is named after a hash of its inputs (data, model and training params, seed), so
re-running an interrupted stage finds the run's state in ``runtime.storage_path`` and resumes
from the last finished epoch (Ray Train restores it; the worker reads ``get_checkpoint()``).
Per-epoch shuffling is seeded by (seed, rank, epoch), so a resumed run sees the same batches.
"""

from __future__ import annotations

import csv
import logging
import math
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
import ray
import torch
from ray.train import Checkpoint, CheckpointConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from components.config import ModelConfig, Params, TrainConfig
from components.data.dataset import load_split
from components.data.schema import shard_paths
from components.data.vocab import Vocab
from components.io import atomic_path, fingerprint, write_json
from components.models.network import _unwrap, build_model, save_trained
from components.models.text import load_glove
from components.plots import training_curves
from components.runtime import (
    cpus_per_worker,
    init_ray,
    remove_storage,
    resolve_use_gpu,
    storage_path,
)
from components.tracking import log_history, stage_run
from components.training import evaluate, make_optimizer, train_epoch
from pipelines.common import repo_root

log = logging.getLogger(__name__)

#: phase -> the domain whose labels it trains on
PHASES = {"pretrain": "source", "oracle": "target"}


def train_worker(config: dict) -> None:
    """Ray Train worker loop (runs once per worker)."""
    import ray.train
    import ray.train.torch
    from ray.experimental.tqdm_ray import tqdm

    tcfg = TrainConfig.model_validate(config["train"])
    mcfg = ModelConfig.model_validate(config["model"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["threads"])
    torch.manual_seed(config["seed"])  # identical initial weights on every rank
    train, val = ray.get(config["train_ref"]), ray.get(config["val_ref"])
    device = ray.train.torch.get_device()

    model = build_model(mcfg, config["vocab_size"], config.get("embeddings"))
    model = ray.train.torch.prepare_model(model)
    indices = np.arange(rank, len(train), world)
    steps = math.ceil(len(indices) / tcfg.batch_size)
    opt, sched = make_optimizer(model, tcfg, steps * tcfg.epochs)
    start, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / "state.pt", map_location=device, weights_only=True)
        _unwrap(model).load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start, history = state["epoch"], state["history"]
        if rank == 0:
            print(f"[{config['phase']}] resuming after epoch {start}/{tcfg.epochs}")

    for epoch in range(start, tcfg.epochs):
        desc = f"{config['phase']} epoch {epoch + 1}/{tcfg.epochs}"
        # a live bar on a terminal; one line per epoch in logs (DVC, CI) that cannot redraw
        bar = tqdm(total=steps, desc=desc) if rank == 0 and config["progress"] else None
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
            on_batch=(lambda _loss, b=bar: b.update(1)) if bar else None,
        )
        if bar:
            bar.close()
        if rank == 0 and not bar:
            print(f"{desc}: loss {stats['loss']:.4f}", flush=True)
        seconds = time.perf_counter() - t0
        row = {
            "epoch": epoch + 1,
            "loss": stats["loss"],
            "lr": sched.get_last_lr()[0],
            "samples_per_s": stats["samples"] * world / seconds,
        }
        with tempfile.TemporaryDirectory() as d:
            ckpt = None
            if rank == 0:
                val_m = evaluate(_unwrap(model), val, 64, device, mcfg.empty_threshold)
                row.update({f"val_{k}": val_m[k] for k in ("oiou", "miou", "map")})
                history.append(row)
                torch.save(
                    {
                        "model": _unwrap(model).state_dict(),
                        "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(),
                        "epoch": epoch + 1,
                        "history": history,
                    },
                    Path(d) / "state.pt",
                )
                ckpt = Checkpoint.from_directory(d)
            ray.train.report(row, checkpoint=ckpt)


def run(params: Params, phase: str, data_dir: Path, out_dir: Path) -> list[dict]:
    """Train ``phase`` on its domain's train split; write the model to ``out_dir`` atomically.

    Returns the per-epoch history (loss, lr, val_oiou, val_miou, val_map).
    """
    domain = PHASES[phase]
    tcfg: TrainConfig = getattr(params, phase)
    mcfg = params.model
    root = repo_root()
    vocab = Vocab.load(data_dir / "vocab.json")
    train = load_split(data_dir, domain, "train", vocab, mcfg.max_words, mcfg.num_superpixels)
    val = load_split(data_dir, domain, "val", vocab, mcfg.max_words, mcfg.num_superpixels)
    embeddings = None
    if mcfg.embeddings == "glove":
        embeddings = load_glove(mcfg.glove_path, vocab, mcfg.embed_dim, params.seed)

    init_ray(params.runtime)
    use_gpu = resolve_use_gpu(tcfg.use_gpu)
    threads = 1 if use_gpu else cpus_per_worker(tcfg.num_workers)
    inputs = [*shard_paths(data_dir, domain, "train"), data_dir / "vocab.json"]
    name = f"{phase}-" + fingerprint(
        inputs,
        {
            "train": tcfg.model_dump(mode="json"),
            "model": mcfg.model_dump(mode="json"),
            "seed": params.seed,
        },
    )
    storage = storage_path(params.runtime, root)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={
            "phase": phase,
            "train": tcfg.model_dump(mode="json"),
            "model": mcfg.model_dump(mode="json"),
            "seed": params.seed,
            "vocab_size": len(vocab),
            "embeddings": embeddings,
            "threads": threads,
            "progress": sys.stderr.isatty(),
            "train_ref": ray.put(train),
            "val_ref": ray.put(val),
        },
        scaling_config=ScalingConfig(
            num_workers=tcfg.num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": 1 if use_gpu else threads},
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as d:
        state = torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=True)
    model = build_model(mcfg, len(vocab))
    model.load_state_dict(state["model"])
    history = state["history"]
    meta = {"phase": phase, "domain": domain, "epochs": tcfg.epochs, "seed": params.seed}
    with atomic_path(out_dir, is_dir=True) as tmp:
        save_trained(tmp, model, mcfg, len(vocab), meta)
        write_history(history, tmp / "history.csv")
    # Finished and materialised: the resume state is no longer needed.
    remove_storage(f"{storage.rstrip('/')}/{name}")
    return history


def write_history(history: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)


def main(params: Params, phase: str, data: str, out: str, metrics: str, plots: str) -> None:
    used = {
        "seed": params.seed,
        "model": params.model.model_dump(mode="json"),
        phase: getattr(params, phase).model_dump(mode="json"),
    }
    with stage_run(phase, params.runtime, used, repo_root()):
        history = run(params, phase, Path(data), Path(out))
        log_history(history)
        final = history[-1]
        write_json(metrics, {k: v for k, v in final.items() if k not in ("lr", "samples_per_s")})
        with atomic_path(plots) as tmp:
            write_history(history, tmp)
        with tempfile.TemporaryDirectory() as d:
            training_curves(history, Path(d) / "curves.png", f"{phase} ({PHASES[phase]} labels)")
            mlflow.log_artifact(str(Path(d) / "curves.png"))
        mlflow.log_artifacts(out, artifact_path="model")
    log.info("%s done: %s", phase, {k: round(v, 4) for k, v in final.items()})
