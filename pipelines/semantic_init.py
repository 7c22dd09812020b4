"""Stage ``init``: SDA stage 2, semantic initialisation (Section 3.2, Eq. 3; Section 3.4).

Continues from the stage-1 weights with ``L_seg + si_weight * L_si`` on the labeled source, the
categories coming from the ``semantics`` stage. With ``init.si: false`` (the ``w/o L_si``
ablation) the same epochs are spent on ``L_seg`` alone, so both variants get the same budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
import torch
import torch.nn.functional as F

from components import train_loop
from components.adaptation.sda.csm import PrototypeBank, semantic_init_loss
from components.adaptation.sda.grounding import apply_grounding, load_grounding
from components.config import Params
from components.data.schema import shard_paths
from components.data.vocab import Vocab
from components.io import atomic_path
from components.models.network import _unwrap, load_trained, save_trained
from components.runtime import init_ray
from components.stage_io import load_labels, load_task_split, task_of, write_history
from components.tasks import Task
from components.tracking import log_stage, stage_run
from components.training import train_epoch
from pipelines.common import repo_root


@dataclass(frozen=True)
class InitInputs:
    task: Task
    vocab_size: int
    init_state: dict  # the stage-1 weights
    categories: np.ndarray  # (N,) CSM category of each source train sample
    train_ref: ray.ObjectRef
    val_ref: ray.ObjectRef


def foreground_pixels(features: torch.Tensor, mask: torch.Tensor, cats: torch.Tensor):
    """Source foreground features V^{s,+} (M, C) of the last encoder layer and their category.

    A cell of the (h, w) feature map is foreground when most of its pixels are.
    """
    b, c, h, w = features.shape
    fg = F.adaptive_avg_pool2d(mask.unsqueeze(1), (h, w))[:, 0] > 0.5  # (B, h, w)
    feats = features.permute(0, 2, 3, 1)[fg]  # (M, C)
    labels = cats.view(b, 1, 1).expand(b, h, w)[fg]
    return feats, labels


def setup_init(spec: train_loop.PhaseSpec) -> train_loop.Phase:
    tcfg, inp = spec.train_config(), spec.payload
    task = inp.task
    train, val = ray.get(inp.train_ref), ray.get(inp.val_ref)
    cats = torch.tensor(inp.categories)
    model = task.build_network(inp.vocab_size)
    model.load_state_dict(inp.init_state)
    w = train_loop.prepare_worker(spec, model, len(train), tcfg)
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
        rng = np.random.default_rng((spec.seed, rank, epoch))
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
            on_batch=(lambda _l: tick()) if tick else None,
            extra_loss=si_loss if tcfg.si and k_s > 1 else None,
        )
        state["protos"], state["seen"] = bank.protos.cpu(), bank.seen.cpu()
        return {"loss": stats["loss"], "l_si": float(np.mean(si_terms)) if si_terms else 0.0}

    def validate() -> dict:
        return task.val_metrics(_unwrap(model), val, device)

    return train_loop.Phase(
        epochs=tcfg.epochs,
        modules={"model": model},
        optimizers={"optimizer": opt, "scheduler": sched},
        train_epoch=run_epoch,
        validate=validate,
        steps_per_epoch=steps,
        extra_state=state,
    )


def run(params: Params, data_dir: Path, base: Path, semantics: Path, out: Path) -> dict:
    mcfg, tcfg = params.model, params.init
    task = task_of(params, data_dir)
    vocab = Vocab.load(data_dir / "vocab.json")
    train = load_task_split(params, data_dir, "source", "train", task, vocab)
    val = load_task_split(params, data_dir, "source", "val", task, vocab)
    cats, _ = load_labels(semantics, train)
    model, _ = load_trained(base)
    # the target-only words the semantics stage grounded (semantics.word_grounding) start
    # from their known words' vectors here, and so in every later stage
    apply_grounding(model, vocab, load_grounding(semantics))
    init_ray(params.runtime)
    state = train_loop.fit(
        params,
        "init",
        tcfg,
        setup_init,
        InitInputs(task, len(vocab), model.state_dict(), cats, ray.put(train), ray.put(val)),
        inputs=[
            *shard_paths(data_dir, "source", "train"),
            base / "model.pt",
            semantics / "labels.parquet",
        ],
    )
    model.load_state_dict(state["modules"]["model"])
    history = state["history"]
    with atomic_path(out, is_dir=True) as tmp:
        save_trained(tmp, model, mcfg, len(vocab), {"phase": "init", "seed": params.seed}, task)
        write_history(history, tmp / "history.csv")
    return state  # log_stage records it, then drops the checkpoint


def main(
    params: Params, data: str, base: str, semantics: str, out: str, metrics: str, plots: str
) -> None:
    used = {
        "seed": params.seed,
        "model": params.model.model_dump(mode="json"),
        "init": params.init.model_dump(mode="json"),
    }
    with stage_run("init", params.runtime, used, repo_root()):
        state = run(params, Path(data), Path(base), Path(semantics), Path(out))
        log_stage("init", state, metrics, plots, out, "init (SDA stage 2: L_seg + L_si)")
