"""Tasks (``data.task``): each owns the network head, the supervised loss, the inference rule
and the metrics, so that every training phase and every adaptation method runs on either.

* ``referring``: image + query -> binary mask (SDA's base network, Eq. 10 loss, the half-max
  inference rule, oIoU / mIoU / mAP / prec@K / zero_acc).
* ``semantic``: image -> C classes per pixel (the same visual encoder and decoder with C
  outputs, pixel cross-entropy with ignore index 255, argmax, per-class IoU / mIoU).

Class-based adaptation methods see both tasks through ``class_logits`` / ``class_labels``: the
referring task is foreground / background, its two-class logits ``[0, l]`` giving exactly the
sigmoid of the response logit ``l`` under a softmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from components.config import ModelConfig
from components.data.cityscapes import MIOU13_CLASSES, SYNTHIA_CLASSES
from components.data.dataset import (
    IGNORE_INDEX,
    SplitArrays,
    iterate_batches,
    network_inputs,
    to_batch,
)
from components.data.synthetic import ENTITY_NOUNS
from components.data.vocab import erasure_mask
from components.losses import multiscale_bce
from components.metrics import semantic_metrics
from components.models.dmmi import auxiliary_loss


@dataclass(frozen=True)
class Task:
    """What every task provides; see the module docstring."""

    model: ModelConfig
    num_classes: int
    class_names: tuple[str, ...] = ()
    ignore_index: int = IGNORE_INDEX

    name = "task"
    #: val metrics this task reports (``val_<name>``)
    val_keys = ()
    #: does a ClassMix-pasted region keep its source label (semantic) or not (referring)
    pasted_label_known = True

    def build_network(self, vocab_size: int, embeddings=None) -> nn.Module:
        raise NotImplementedError

    def forward(self, net: nn.Module, batch: dict) -> dict:
        raise NotImplementedError

    def training_inputs(
        self, batch: dict, data: SplitArrays, rows: np.ndarray, rng: np.random.Generator
    ) -> dict:
        """``batch`` plus what only a supervised training step feeds the network (DMMI's erased
        words); no random draw unless the network takes such an input."""
        return batch

    def supervised_loss(self, out: dict, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def auxiliary_loss(self, out: dict, batch: dict) -> torch.Tensor | None:
        """The base network's own auxiliary training terms on a labeled batch, already weighted
        (DMMI's L_sim + L_con), or None when ``out`` carries none; ``supervised_loss``
        includes it, a method that writes its own segmentation loss adds it."""
        return None

    def class_logits(self, out: dict) -> torch.Tensor:
        """(B, K, H, W) class logits at image resolution."""
        raise NotImplementedError

    def class_labels(self, batch: dict) -> torch.Tensor:
        """(B, H, W) int64 labels of a labeled batch, ``ignore_index`` where unknown."""
        raise NotImplementedError

    def pixel_features(self, out: dict) -> torch.Tensor:
        """(B, C, h, w) the pixel embedding class-level methods contrast / bank: the finest
        decoder input (query-conditioned on the referring task)."""
        return out["fused"][0]

    def visual_features(self, out: dict) -> torch.Tensor:
        """(B, C, h, w) the visual encoder's last layer (what MMD / DANN align)."""
        return out["features"]

    def sentence(self, out: dict) -> torch.Tensor | None:
        """(B, C) the query representation, or None when the task has no query."""
        return None

    def mix_region(self, batch: dict, gen: torch.Generator) -> torch.Tensor:
        """(B, H, W) bool: the source pixels ClassMix pastes (DACS)."""
        raise NotImplementedError

    def predict(self, net, data: SplitArrays, batch_size: int, device) -> tuple:
        raise NotImplementedError

    def metrics(self, preds, scores, data: SplitArrays) -> dict[str, float]:
        raise NotImplementedError

    def val_metrics(self, net, data: SplitArrays, device) -> dict[str, float]:
        """The per-epoch validation row of every training phase."""
        preds, scores = self.predict(net, data, 64, device)
        m = self.metrics(preds, scores, data)
        return {f"val_{k}": m[k] for k in self.val_keys}

    def unsupervised_metrics(self, student, teacher, data: SplitArrays, device) -> dict:
        raise NotImplementedError


@dataclass(frozen=True)
class ReferringTask(Task):
    name = "referring"
    val_keys = ("oiou", "miou", "map")
    pasted_label_known = False  # a pasted source object's status under the target query

    def build_network(self, vocab_size: int, embeddings=None) -> nn.Module:
        from components.models.network import build_model

        return build_model(self.model, vocab_size, embeddings)

    def forward(self, net, batch):
        """The network on a batch; a batch's training-only ``erase`` reaches it only while it
        trains, so evaluation never erases."""
        args, kwargs = network_inputs(batch)
        if "erase" in batch and net.training:
            return net(*args, erase=batch["erase"], **kwargs)
        return net(*args, **kwargs)

    def training_inputs(self, batch, data, rows, rng):
        """DMMI (``model.arch: dmmi``): ``erase``, (B, N) bool, one entity word of each query
        (``components.data.synthetic.ENTITY_NOUNS``) at the tokenizer's positions."""
        if self.model.arch != "dmmi":
            return batch
        texts = [data.queries[r] for r in rows]
        erase = erasure_mask(texts, batch["tokens"].shape[1], ENTITY_NOUNS, rng)
        return {**batch, "erase": torch.from_numpy(erase).to(batch["tokens"].device)}

    def supervised_loss(self, out, batch):
        """L_seg (Eq. 10); plus DMMI's weighted L_sim + L_con when the network returned their
        terms (given erased words in training), delta = the sample's mask is not empty."""
        loss = multiscale_bce(out["logits"], out["full_logits"].float(), batch["mask"])
        aux = self.auxiliary_loss(out, batch)
        return loss if aux is None else loss + aux

    def auxiliary_loss(self, out, batch):
        if "sim_terms" not in out:
            return None
        has_target = batch["mask"].flatten(1).any(1)  # delta: off for one-to-zero samples
        return auxiliary_loss(out, has_target, self.model.dmmi)

    def class_logits(self, out):
        logit = out["full_logits"].float()  # (B, H, W)
        return torch.stack([torch.zeros_like(logit), logit], 1)  # (B, 2, H, W)

    def class_labels(self, batch):
        return batch["mask"].long()

    def sentence(self, out):
        m = out["word_mask"].unsqueeze(-1).float()
        return (out["query"] * m).sum(1) / m.sum(1).clamp_min(1)  # (B, C)

    def mix_region(self, batch, gen):
        # the referred source object (the foreground class); see components.adaptation.mixing
        return batch["mask"] > 0.5

    def predict(self, net, data, batch_size, device):
        from components.training import predict

        return predict(net, data, batch_size, device, self.model.empty_threshold)

    def metrics(self, preds, scores, data):
        """Over all queries (``oiou``, ``miou``, ``map``, ``prec@K``, ``zero_acc``), then by
        query type (``one/…``, ``many/…``, ``targets/…``, ``zero/acc``: DMMI's layout)."""
        from components.metrics import query_type_metrics, referring_metrics

        return {
            **referring_metrics(list(preds), list(data.masks), list(scores)),
            **query_type_metrics(list(preds), list(data.masks), data.query_types),
        }

    def unsupervised_metrics(self, student, teacher, data, device):
        from components.training import unsupervised_metrics

        return unsupervised_metrics(student, teacher, data, device, self.model.empty_threshold)


@dataclass(frozen=True)
class SemanticTask(Task):
    name = "semantic"
    val_keys = ("miou", "pixel_acc")

    def build_network(self, vocab_size: int, embeddings=None) -> nn.Module:
        from components.models.semantic import SemanticSegNet

        return SemanticSegNet(self.model, self.num_classes)

    def forward(self, net, batch):
        return net(batch["image"])

    def supervised_loss(self, out, batch):
        """Pixel cross-entropy at image resolution and at every decoder scale (upsampled),
        averaged: the semantic counterpart of Eq. 10's multi-scale supervision."""
        label = batch["label"]
        size = label.shape[-2:]
        losses = [F.cross_entropy(out["full_logits"].float(), label, ignore_index=IGNORE_INDEX)]
        for lg in out["logits"][1:]:
            up = F.interpolate(lg.float(), size=size, mode="bilinear")
            losses.append(F.cross_entropy(up, label, ignore_index=IGNORE_INDEX))
        return torch.stack(losses).mean()

    def class_logits(self, out):
        return out["full_logits"].float()

    def class_labels(self, batch):
        return batch["label"]

    def mix_region(self, batch, gen):
        """ClassMix (Olsson et al., 2021): half of the classes present in each source label
        map (rounded up), chosen at random."""
        labels = batch["label"]
        region = torch.zeros_like(labels, dtype=torch.bool)
        for i in range(len(labels)):
            present = labels[i].unique()
            present = present[present != IGNORE_INDEX].cpu()
            if len(present) == 0:
                continue
            k = (len(present) + 1) // 2
            chosen = present[torch.randperm(len(present), generator=gen)[:k]]
            region[i] = torch.isin(labels[i], chosen.to(labels.device))
        return region

    @torch.no_grad()
    def predict(self, net, data, batch_size, device):
        net.eval()
        preds, scores = [], []
        for idx in iterate_batches(len(data), batch_size, shuffle=False):
            batch = to_batch(data, idx, device)
            prob = self.forward(net, batch)["full_logits"].float().softmax(1)
            conf, pred = prob.max(1)
            preds.append(pred.to(torch.uint8).cpu().numpy())
            scores.append(conf.mean((1, 2)).cpu().numpy())
        return np.concatenate(preds), np.concatenate(scores)

    def metrics(self, preds, scores, data):
        names = self.class_names or tuple(str(c) for c in range(self.num_classes))
        out = semantic_metrics(list(preds), list(data.labels), self.num_classes, self.ignore_index)
        renamed = {k: v for k, v in out.items() if not k.startswith("iou/")}
        for k, v in out.items():
            if k.startswith("iou/"):
                renamed[f"iou/{names[int(k[4:])]}"] = v
        if tuple(names) == SYNTHIA_CLASSES:  # SYNTHIA -> Cityscapes also reports mIoU*
            per_class = [renamed[f"iou/{c}"] for c in MIOU13_CLASSES if f"iou/{c}" in renamed]
            renamed["miou13"] = float(np.mean(per_class)) if per_class else 0.0
        renamed["n"] = float(len(preds))
        return renamed

    @torch.no_grad()
    def unsupervised_metrics(self, student, teacher, data, device):
        """``unsup_confidence``: 1 - mean normalised entropy of the student's class
        distribution; ``unsup_agreement``: pixel agreement of student and teacher argmax."""
        student.eval()
        ent, agree, pixels = 0.0, 0, 0
        for idx in iterate_batches(len(data), 64, shuffle=False):
            batch = to_batch(data, idx, device)
            p = self.forward(student, batch)["full_logits"].float().softmax(1)
            h = -(p * p.clamp_min(1e-8).log()).sum(1) / np.log(self.num_classes)
            ent += h.sum().item()
            pixels += h.numel()
            if teacher is not None:
                teacher.eval()
                pt = self.forward(teacher, batch)["full_logits"].argmax(1)
                agree += (pt == p.argmax(1)).sum().item()
        out = {"unsup_confidence": 1.0 - ent / max(1, pixels)}
        if teacher is not None:
            out["unsup_agreement"] = agree / max(1, pixels)
        return out


TASKS: dict[str, type[Task]] = {"referring": ReferringTask, "semantic": SemanticTask}


def make_task(name: str, model: ModelConfig, class_names: list[str] | None = None) -> Task:
    """The task ``name``; the semantic task needs the dataset's class names (``classes.json``)."""
    if name not in TASKS:
        raise ValueError(f"data.task: unknown task {name!r} (one of {', '.join(TASKS)})")
    if name == "semantic":
        if not class_names:
            raise ValueError("the semantic task needs the dataset's class names")
        # label maps and predictions are uint8 with 255 the ignore index
        if not 2 <= len(class_names) <= IGNORE_INDEX:
            raise ValueError(
                f"the semantic task needs 2 to {IGNORE_INDEX} classes, got {len(class_names)}"
            )
        return SemanticTask(model, len(class_names), tuple(class_names))
    return ReferringTask(model, 2, ("background", "foreground"))
