"""Stage ``init``: SDA stage 2, semantic initialisation (Section 3.2, Eq. 3; Section 3.4).

Continues from the stage-1 weights with ``L_seg + si_weight * L_si`` on the labeled source, the
categories coming from the ``semantics`` stage. With ``init.si: false`` (the ``w/o L_si``
ablation) the same epochs are spent on ``L_seg`` alone, so both variants get the same budget.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import ray
import torch
import torch.nn.functional as F

from components.adaptation.sda.csm import PrototypeBank, semantic_init_loss
from components.config import InitConfig, ModelConfig, Params
from components.data.dataset import load_split
from components.data.schema import shard_paths
from components.data.vocab import Vocab
from components.io import atomic_path
from components.models.network import _unwrap, build_model, load_trained, save_trained
from components.runtime import init_ray
from components.tracking import stage_run
from components.training import train_epoch, val_metrics
from pipelines import ray_train
from pipelines.common import repo_root
from pipelines.semantics import load_labels
from pipelines.train import log_stage, write_history


def foreground_pixels(features: torch.Tensor, mask: torch.Tensor, cats: torch.Tensor):
    """Source foreground features V^{s,+} (M, C) of the last encoder layer and their category.

    A cell of the (h, w) feature map is foreground when most of its pixels are.
    """
    b, c, h, w = features.shape
    fg = F.adaptive_avg_pool2d(mask.unsqueeze(1), (h, w))[:, 0] > 0.5  # (B, h, w)
    feats = features.permute(0, 2, 3, 1)[fg]  # (M, C)
    labels = cats.view(b, 1, 1).expand(b, h, w)[fg]
    return feats, labels


def setup_init(config: dict) -> ray_train.Phase:
    tcfg = InitConfig.model_validate(config["train"])
    mcfg = ModelConfig.model_validate(config["model"])
    train, val = ray.get(config["train_ref"]), ray.get(config["val_ref"])
    cats = torch.tensor(config["categories"])
    model = build_model(mcfg, config["vocab_size"])
    model.load_state_dict(config["init_state"])
    w = ray_train.prepare_worker(config, model, len(train), tcfg)
    model, device, rank, indices = w.model, w.device, w.rank, w.indices
    steps, opt, sched = w.steps, w.optimizer, w.scheduler
    k_s = int(cats.max()) + 1
    state = {"protos": torch.zeros(0), "seen": torch.zeros(0, dtype=torch.bool)}
    bank = PrototypeBank(k_s, _unwrap(model).visual.out_channels[-1])
    si_terms: list[float] = []

    def si_loss(out, batch, rows):
        feats, labels = foreground_pixels(out["features"], batch["mask"], cats[rows].to(device))
        loss = semantic_init_loss(feats, labels, bank, tcfg.si_temperature)
        si_terms.append(loss.item())
        return tcfg.si_weight * loss

    def run_epoch(epoch: int, tick) -> dict:
        if state["protos"].numel():  # restored from a checkpoint
            bank.protos, bank.seen = state["protos"].clone(), state["seen"].clone()
        si_terms.clear()
        rng = np.random.default_rng((config["seed"], rank, epoch))
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
            on_batch=(lambda _l: tick()) if tick else None,
            extra_loss=si_loss if tcfg.si and k_s > 1 else None,
        )
        state["protos"], state["seen"] = bank.protos.cpu(), bank.seen.cpu()
        return {"loss": stats["loss"], "l_si": float(np.mean(si_terms)) if si_terms else 0.0}

    def validate() -> dict:
        return val_metrics(_unwrap(model), val, device, mcfg.empty_threshold)

    return ray_train.Phase(
        epochs=tcfg.epochs,
        modules={"model": model},
        optimizers={"optimizer": opt, "scheduler": sched},
        train_epoch=run_epoch,
        validate=validate,
        steps_per_epoch=steps,
        extra_state=state,
    )


def run(params: Params, data_dir: Path, base: Path, semantics: Path, out: Path) -> list[dict]:
    mcfg, tcfg = params.model, params.init
    vocab = Vocab.load(data_dir / "vocab.json")
    train = load_split(data_dir, "source", "train", vocab, mcfg.max_words, mcfg.num_superpixels)
    val = load_split(data_dir, "source", "val", vocab, mcfg.max_words, mcfg.num_superpixels)
    cats, _ = load_labels(semantics, train)
    model, _ = load_trained(base)
    init_ray(params.runtime)
    state = ray_train.fit(
        params,
        "init",
        tcfg,
        setup_init,
        {
            "train": tcfg.model_dump(mode="json"),
            "model": mcfg.model_dump(mode="json"),
            "vocab_size": len(vocab),
            "init_state": model.state_dict(),
            "categories": cats,
            "train_ref": ray.put(train),
            "val_ref": ray.put(val),
        },
        inputs=[
            *shard_paths(data_dir, "source", "train"),
            base / "model.pt",
            semantics / "labels.parquet",
        ],
    )
    model.load_state_dict(state["modules"]["model"])
    history = state["history"]
    with atomic_path(out, is_dir=True) as tmp:
        save_trained(tmp, model, mcfg, len(vocab), {"phase": "init", "seed": params.seed})
        write_history(history, tmp / "history.csv")
    ray_train.finish(state)
    return history


def main(
    params: Params, data: str, base: str, semantics: str, out: str, metrics: str, plots: str
) -> None:
    used = {
        "seed": params.seed,
        "model": params.model.model_dump(mode="json"),
        "init": params.init.model_dump(mode="json"),
    }
    with stage_run("init", params.runtime, used, repo_root()):
        history = run(params, Path(data), Path(base), Path(semantics), Path(out))
        log_stage("init", history, metrics, plots, out, "init (SDA stage 2: L_seg + L_si)")
