"""Stage ``adapt``: SDA stage 3 through Ray Train (Section 3.3; the method in ``adapt.method``).

Starts from the ``init`` model; each step draws a source batch (with annotations) and a target
batch whose masks are the semantic-based masks of the ``masks`` stage (target ground truth is
never read, except by the per-epoch validation on the labeled target val split, which is
reporting only: Fig. 4's curve). Writes the adapted main network like any other model, so
``evaluate`` treats it as one more model.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from pathlib import Path

import mlflow
import numpy as np
import ray
import torch

from components.adaptation import METHODS
from components.adaptation.sda.cfb import masked_mean
from components.adaptation.sda.method import cells
from components.config import AdaptConfig, ModelConfig, Params
from components.data.dataset import iterate_batches, load_split, to_batch
from components.data.schema import shard_paths
from components.data.vocab import Vocab
from components.io import atomic_path
from components.models.network import build_model, load_trained, save_trained
from components.plots import reciprocal_masks, tsne_domains
from components.runtime import init_ray
from components.tracking import stage_run
from components.training import make_optimizer, unsupervised_metrics, val_metrics
from pipelines import ray_train
from pipelines.common import repo_root
from pipelines.masks import load_masks
from pipelines.semantics import load_labels
from pipelines.train import log_stage, write_history

log = logging.getLogger(__name__)


def setup_adapt(config: dict) -> ray_train.Phase:
    """The adaptation phase; runs in a Ray Train worker, or in a Ray Tune trial (sweeps)."""
    cfg = AdaptConfig.model_validate(config["train"])
    mcfg = ModelConfig.model_validate(config["model"])
    rank, world, device = ray_train.worker_info(config)
    src, tgt, val = (ray.get(config[k]) for k in ("source_ref", "target_ref", "val_ref"))
    # copies: arrays from the object store are read-only
    src_cat = torch.tensor(config["source_categories"])
    tgt_cat = torch.tensor(config["target_categories"])
    tgt_common = torch.tensor(config["target_common"])
    k_s = int(src_cat.max()) + 1
    common_set = torch.zeros(k_s, dtype=torch.bool)
    common_set[tgt_cat[tgt_common & (tgt_cat < k_s)].unique()] = True
    base = build_model(mcfg, config["vocab_size"])
    base.load_state_dict(config["init_state"])
    method = METHODS[cfg.method](base, cfg, mcfg.hidden, mcfg.scales).to(device)
    s_idx, t_idx = np.arange(rank, len(src), world), np.arange(rank, len(tgt), world)
    steps = math.ceil(min(len(s_idx), len(t_idx)) / cfg.batch_size)
    trainable = list(method.trainable())
    opt, sched = make_optimizer(trainable, cfg, steps * cfg.epochs)
    gen = torch.Generator().manual_seed(config["seed"])

    def run_epoch(epoch: int, tick) -> dict:
        method.train()
        rng = np.random.default_rng((config["seed"], rank, epoch))
        t_order = rng.permutation(t_idx)
        sums: dict[str, float] = {}
        n = 0
        for i, bidx in enumerate(iterate_batches(len(s_idx), cfg.batch_size, True, rng)):
            if i >= steps:
                break
            rows_s = s_idx[bidx]
            rows_t = t_order[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            sb, tb = to_batch(src, rows_s, device), to_batch(tgt, rows_t, device)
            loss, logs = method.loss(
                sb,
                tb,
                src_cat[rows_s].to(device),
                tgt_cat[rows_t].to(device),
                tgt_common[rows_t].to(device),
                common_set.to(device),
                gen,
            )
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite adaptation loss {loss.item()}: {logs}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            ray_train.average_gradients(trainable, world)
            opt.step()
            sched.step()
            method.update_teacher()
            for k, v in {"loss": loss.item(), **logs}.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            n += 1
            if tick:
                tick()
        row = {k: v / max(1, n) for k, v in sums.items() if k != "empty_pseudo"}
        row["empty_pseudo_batches"] = sums.get("empty_pseudo", 0.0)
        if row["empty_pseudo_batches"]:
            print(
                f"warning: {int(row['empty_pseudo_batches'])} target batches had no pseudo "
                f"foreground above gamma_max={cfg.gamma_max}; their contrast was skipped"
            )
        return row

    def validate() -> dict:
        # labeled target val (reporting / sweep objective) + criteria that need no labels
        return {
            **val_metrics(method.student, val, device, mcfg.empty_threshold),
            **unsupervised_metrics(
                method.student, method.teacher, val, device, mcfg.empty_threshold
            ),
        }

    return ray_train.Phase(
        epochs=cfg.epochs,
        modules={"method": method},
        optimizers={"optimizer": opt, "scheduler": sched},
        train_epoch=run_epoch,
        validate=validate,
        steps_per_epoch=steps,
    )


def phase_config(params: Params, vocab_size: int, init_state: dict, labels, refs) -> dict:
    """What ``setup_adapt`` reads. ``labels``: (source category, target category, target
    common flag) arrays; ``refs``: ObjectRefs of the source train, target train (semantic-based
    masks in place of its annotations) and labeled target val splits."""
    src_cat, tgt_cat, tgt_common = labels
    source_ref, target_ref, val_ref = refs
    return {
        "train": params.adapt.model_dump(mode="json"),
        "model": params.model.model_dump(mode="json"),
        "vocab_size": vocab_size,
        "init_state": init_state,
        "source_categories": src_cat,
        "target_categories": tgt_cat,
        "target_common": tgt_common,
        "source_ref": source_ref,
        "target_ref": target_ref,
        "val_ref": val_ref,
    }


def load_inputs(params: Params, data_dir: Path, semantics: Path, masks: Path):
    """Vocab, the three splits (target train masks = semantic-based masks) and CSM labels."""
    mcfg = params.model
    vocab = Vocab.load(data_dir / "vocab.json")
    args = (vocab, mcfg.max_words, mcfg.num_superpixels)
    source = load_split(data_dir, "source", "train", *args)
    target = load_split(data_dir, "target", "train", *args)
    val = load_split(data_dir, "target", "val", *args)
    # the target ground truth is replaced by the semantic-based masks before anything trains
    target = replace(target, masks=load_masks(masks, target))
    src_cat, _ = load_labels(semantics, source)
    tgt_cat, tgt_common = load_labels(semantics, target)
    return vocab, (source, target, val), (src_cat, tgt_cat, tgt_common)


def run(
    params: Params, data_dir: Path, init: Path, semantics: Path, masks: Path, out: Path
) -> list[dict]:
    mcfg, cfg = params.model, params.adapt
    vocab, (source, target, val), (src_cat, tgt_cat, tgt_common) = load_inputs(
        params, data_dir, semantics, masks
    )
    model, _ = load_trained(init)
    init_ray(params.runtime)
    state = ray_train.fit(
        params,
        "adapt",
        cfg,
        setup_adapt,
        phase_config(
            params,
            len(vocab),
            model.state_dict(),
            (src_cat, tgt_cat, tgt_common),
            (ray.put(source), ray.put(target), ray.put(val)),
        ),
        inputs=[
            *shard_paths(data_dir, "source", "train"),
            init / "model.pt",
            semantics / "labels.parquet",
            masks / "semantic_masks.parquet",
        ],
    )
    prefix = "student."
    student = {
        k[len(prefix) :]: v for k, v in state["modules"]["method"].items() if k.startswith(prefix)
    }
    model.load_state_dict(student)
    history = state["history"]
    with atomic_path(out, is_dir=True) as tmp:
        save_trained(
            tmp,
            model,
            mcfg,
            len(vocab),
            {"phase": "adapt", "method": cfg.method, "seed": params.seed},
        )
        write_history(history, tmp / "history.csv")
    ray_train.finish(state)
    return history


@torch.no_grad()
def figures(
    params: Params, data_dir: Path, init: Path, adapted: Path, masks: Path, out: Path, n=300
) -> None:
    """Fig. 7 (t-SNE of foreground features before / after) and Fig. 9 (reciprocal masks).

    Visualisation only: the foreground of both domains is taken from the annotations here.
    """
    mcfg = params.model
    vocab = Vocab.load(data_dir / "vocab.json")
    args = (vocab, mcfg.max_words, mcfg.num_superpixels)
    splits = {d: load_split(data_dir, d, "train", *args) for d in ("source", "target")}
    feats: dict[str, dict] = {}
    for name, folder in (("before", init), ("after", adapted)):
        model, _ = load_trained(folder)
        model.eval()
        feats[name] = {}
        for domain, data in splits.items():
            rows = np.flatnonzero(data.masks.any((1, 2)))[:n]
            batch = to_batch(data, rows, torch.device("cpu"))
            f = model(batch["image"], batch["tokens"], batch["lengths"], batch["superpixels"])
            mean, _ = masked_mean(f["features"], cells(batch["mask"], f["features"].shape[-2:]))
            feats[name][domain] = mean.numpy()
    tsne_domains(feats["before"], feats["after"], out / "tsne.png", params.seed)

    target = splits["target"]
    rows = np.arange(min(6, len(target)))
    model, _ = load_trained(init)
    model.eval()
    batch = to_batch(target, rows, torch.device("cpu"))
    resp = model(batch["image"], batch["tokens"], batch["lengths"], batch["superpixels"])
    domain_masks = (resp["response"] > params.adapt.gamma_max).numpy()
    semantic = load_masks(masks, target)[rows]
    queries = [target.queries[i] for i in rows]
    reciprocal_masks(
        target.images[rows], domain_masks, semantic, queries, out / "reciprocal_masks.png"
    )


def main(
    params: Params,
    data: str,
    init: str,
    semantics: str,
    masks: str,
    out: str,
    metrics: str,
    plots: str,
    figures_dir: str | None = None,
) -> None:
    used = {
        "seed": params.seed,
        "model": params.model.model_dump(mode="json"),
        "adapt": params.adapt.model_dump(mode="json"),
    }
    with stage_run("adapt", params.runtime, used, repo_root()):
        history = run(params, Path(data), Path(init), Path(semantics), Path(masks), Path(out))
        title = f"adapt ({params.adapt.method}, target val per epoch)"
        log_stage("adapt", history, metrics, plots, out, title)
        if figures_dir:
            with atomic_path(figures_dir, is_dir=True) as tmp:
                figures(params, Path(data), Path(init), Path(out), Path(masks), tmp)
                mlflow.log_artifacts(str(tmp), artifact_path="figures")
