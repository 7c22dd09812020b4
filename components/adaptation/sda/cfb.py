"""Contrastive Feature Branch (SDA Section 3.3.1, Eq. 4).

* target pseudo masks from the response map: ``> gamma_max`` foreground, ``< gamma_min``
  background, in between ignored (relative to each map's maximum, see ``pseudo_masks``);
* bidirectional pixel-level InfoNCE between source foreground pixels and reliable target
  pixels of the same semantic category (Eq. 4), the full loss ``L_s->t + L_t->s``;
* a memory bank of ``B`` entries per common category per domain (FIFO);
* a mean teacher (EMA) whose features fill the bank and whose response map gives the pseudo
  masks, so both are stable while the student moves.

Choices (assumed): a bank entry is one sample's mean foreground feature of the last encoder
layer (L2-normalised), not a whole feature map; several positives per anchor are handled with
the multi-positive form ``-log(sum_pos e^s / sum_all e^s)``; anchors whose category has no
positive are skipped (counted and reported, never a silent zero loss).
"""

from __future__ import annotations

from collections import deque

import torch
import torch.nn.functional as F
from torch import nn


def pseudo_masks(response: torch.Tensor, gamma_max: float, gamma_min: float):
    """(B, H, W) scores in [0, 1] -> (foreground, background) bool masks; the rest is ignored.

    The thresholds apply to the response relative to its per-sample maximum (assumed), the
    same normalisation as the inference rule (foreground above half the maximum): a source
    model is under-confident on the target, and absolute scores above 0.9 would leave almost
    every target batch without a pseudo foreground.
    """
    rel = response / response.flatten(1).amax(1).clamp_min(1e-6).view(-1, 1, 1)
    return rel > gamma_max, rel < gamma_min


class MemoryBank:
    """Per (domain, category) FIFO queues of at most ``size`` feature vectors."""

    def __init__(self, size: int):
        self.size = size
        self.queues: dict[tuple[str, int], deque] = {}

    def push(self, domain: str, feats: torch.Tensor, cats: torch.Tensor) -> None:
        for f, c in zip(feats.detach().cpu(), cats.tolist(), strict=True):
            self.queues.setdefault((domain, int(c)), deque(maxlen=self.size)).append(f)

    def get(self, domain: str, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """All entries of ``domain`` as (M, C) features and (M,) categories (may be empty)."""
        feats, cats = [], []
        for (d, c), q in sorted(self.queues.items()):
            if d == domain and q:
                feats.append(torch.stack(list(q)))
                cats += [c] * len(q)
        if not feats:
            return torch.zeros(0, 0, device=device), torch.zeros(0, dtype=torch.long, device=device)
        return torch.cat(feats).to(device), torch.tensor(cats, device=device)

    def __len__(self) -> int:
        return sum(len(q) for q in self.queues.values())

    def state(self) -> dict:
        """The queues as plain lists and tensors (what a ``weights_only`` checkpoint holds)."""
        keys = sorted(self.queues)
        return {
            "keys": [[d, c] for d, c in keys],
            "feats": [torch.stack(list(self.queues[k])) if self.queues[k] else None for k in keys],
        }

    def load(self, state: dict) -> None:
        """Restore :meth:`state`'s queues, oldest entry first, as they were."""
        self.queues = {}
        for (domain, cat), feats in zip(state["keys"], state["feats"], strict=True):
            queue = self.queues.setdefault((domain, int(cat)), deque(maxlen=self.size))
            if feats is not None:
                queue.extend(feats.unbind(0))


def info_nce(
    anchors: torch.Tensor,
    anchor_cats: torch.Tensor,
    keys: torch.Tensor,
    key_cats: torch.Tensor,
    temperature: float,
    contrastive: bool = True,
) -> tuple[torch.Tensor, int]:
    """Multi-positive InfoNCE of Eq. 4.

    Args:
        anchors: (M, C) and keys: (K, C), L2-normalised; anchor_cats: (M,) categories;
        key_cats: (K,) categories, -1 for background keys (negatives for everyone).
        contrastive: False gives the ``w/o contrastive`` ablation: only pull positives closer
            (``1 - cos``), no negatives.
    Returns:
        (loss, number of anchors that had a positive). The loss is 0 with a gradient path if
        no anchor had one.
    """
    if anchors.numel() == 0 or keys.numel() == 0:
        return anchors.sum() * 0.0, 0
    sim = anchors @ keys.T  # (M, K)
    pos = anchor_cats.unsqueeze(1) == key_cats.unsqueeze(0)  # (M, K)
    has_pos = pos.any(1)
    n = int(has_pos.sum())
    if n == 0:
        return anchors.sum() * 0.0, 0
    sim, pos = sim[has_pos], pos[has_pos]
    if not contrastive:
        return ((1 - sim) * pos).sum(1).div(pos.sum(1)).mean(), n
    logits = sim / temperature
    log_all = torch.logsumexp(logits, dim=1)
    log_pos = torch.logsumexp(logits.masked_fill(~pos, float("-inf")), dim=1)
    return (log_all - log_pos).mean(), n


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """Mean teacher: ``t = m t + (1 - m) s`` for parameters; buffers are copied."""
    for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
        t.mul_(momentum).add_(s.detach(), alpha=1 - momentum)
    for t, s in zip(teacher.buffers(), student.buffers(), strict=True):
        t.copy_(s)


def pixel_features(features: torch.Tensor, mask: torch.Tensor, limit: int, generator=None):
    """Normalised features (M, C) of pixels where ``mask`` (B, h, w) is set, with their sample
    index (M,); at most ``limit`` pixels, sampled uniformly, to bound the similarity matrix."""
    b, c, h, w = features.shape
    flat = features.permute(0, 2, 3, 1).reshape(-1, c)
    idx = mask.reshape(-1).nonzero().squeeze(1)
    if idx.numel() > limit:
        pick = torch.randperm(idx.numel(), generator=generator, device="cpu")[:limit]
        idx = idx[pick.to(idx.device)]
    return F.normalize(flat[idx], dim=1), idx // (h * w)


def masked_mean(features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample mean feature (B, C) over ``mask`` (B, h, w) and a (B,) bool of non-empty."""
    m = mask.float().unsqueeze(1)
    area = m.sum((2, 3))
    mean = (features * m).sum((2, 3)) / area.clamp_min(1)
    return mean, area.squeeze(1) > 0
