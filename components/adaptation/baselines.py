"""The uni-modal baselines of SDA's comparison (Appendix C.3) and the no-adaptation floor.

* ``SourceOnly``: the same schedule on the labeled source alone (same budget as any method).
* ``MMD`` (Long et al., 2015): multi-kernel maximum mean discrepancy between source and target
  pixel-level visual features and, on the referring task, query features (as SDA applies it).
* ``DANN`` (Ganin and Lempitsky, 2015): a domain classifier behind a gradient-reversal layer on
  the same features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from components.adaptation.base import AdaptationMethod
from components.adaptation.configs import AlignConfig, DANNConfig, MMDConfig, SourceOnlyConfig


class SourceOnly(AdaptationMethod):
    Config = SourceOnlyConfig

    def step(self, src, tgt, gen):
        loss = self.task.supervised_loss(self.task.forward(self.student, src), src)
        return loss, {"l_src": loss.item()}


def sample_pixels(features: torch.Tensor, limit: int, gen: torch.Generator) -> torch.Tensor:
    """(B, C, h, w) -> (M, C) with M <= ``limit`` pixels drawn uniformly without replacement."""
    flat = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
    if len(flat) > limit:
        flat = flat[torch.randperm(len(flat), generator=gen)[:limit].to(flat.device)]
    return flat


def mmd2(x: torch.Tensor, y: torch.Tensor, bandwidths: list[float]) -> torch.Tensor:
    """Biased multi-kernel MMD^2 between samples x (N, C) and y (M, C): a sum of Gaussian
    kernels whose widths are ``bandwidths`` times the median pairwise squared distance
    (detached). Zero when x and y are the same sample."""
    z = torch.cat([x, y])
    d2 = torch.cdist(z, z).pow(2)
    scale = d2.detach()[d2.detach() > 0].median() if (d2 > 0).any() else d2.new_tensor(1.0)
    k = sum(torch.exp(-d2 / (scale * b)) for b in bandwidths)
    n = len(x)
    return k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean()


class _Aligner(AdaptationMethod):
    """Source supervision plus an alignment term on visual pixels (and queries)."""

    Config = AlignConfig

    def features(self, out_s, out_t, gen) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(source, target) pairs of feature samples to align: pixels, then sentences."""
        pairs = [
            (
                sample_pixels(self.task.visual_features(out_s), self.cfg.pixels, gen),
                sample_pixels(self.task.visual_features(out_t), self.cfg.pixels, gen),
            )
        ]
        q_s, q_t = self.task.sentence(out_s), self.task.sentence(out_t)
        if self.cfg.query and q_s is not None:
            pairs.append((q_s, q_t))
        return pairs

    def align(self, pairs) -> torch.Tensor:
        raise NotImplementedError

    def step(self, src, tgt, gen):
        out_s = self.task.forward(self.student, src)
        out_t = self.task.forward(self.student, tgt)
        loss_src = self.task.supervised_loss(out_s, src)
        loss_align = self.align(self.features(out_s, out_t, gen))
        total = loss_src + self.cfg.weight * loss_align
        return total, {"l_src": loss_src.item(), "l_align": loss_align.item()}


class MMD(_Aligner):
    Config = MMDConfig

    def align(self, pairs):
        return sum(mmd2(a, b, self.cfg.bandwidths) for a, b in pairs)


class GradientReversal(torch.autograd.Function):
    """Identity forward; the gradient multiplied by ``-coeff`` backward."""

    @staticmethod
    def forward(ctx, x, coeff: float):
        ctx.coeff = coeff
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.coeff * grad, None


def grad_reverse(x: torch.Tensor, coeff: float = 1.0) -> torch.Tensor:
    return GradientReversal.apply(x, coeff)


class DANN(_Aligner):
    Config = DANNConfig

    def __init__(self, network, cfg, task, upstream):
        super().__init__(network, cfg, task, upstream)
        vis = _channels(task, network)
        dims = [vis] + ([task.model.hidden] if cfg.query and task.name == "referring" else [])
        self.discriminators = nn.ModuleList(
            nn.Sequential(nn.Linear(d, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, 1))
            for d in dims
        )

    def step(self, src, tgt, gen):
        # ``weight`` scales only the reversed gradient that reaches the network: the domain
        # classifier itself always learns at full rate (its loss is added unweighted)
        out_s = self.task.forward(self.student, src)
        out_t = self.task.forward(self.student, tgt)
        loss_src = self.task.supervised_loss(out_s, src)
        loss_dom = self.align(self.features(out_s, out_t, gen))
        return loss_src + loss_dom, {"l_src": loss_src.item(), "l_domain": loss_dom.item()}

    def align(self, pairs):
        """Domain-classification loss through the reversal: the classifier learns to tell the
        domains apart, the network (gradients reversed, scaled by ``weight``) learns features
        it cannot."""
        total = 0.0
        for disc, (a, b) in zip(self.discriminators, pairs, strict=True):
            logits = disc(grad_reverse(torch.cat([a, b]), self.cfg.weight))[:, 0]
            domain = torch.cat([torch.zeros(len(a)), torch.ones(len(b))]).to(logits.device)
            total = total + F.binary_cross_entropy_with_logits(logits, domain)
        return total


def _channels(task, network) -> int:
    """Channels of the visual features the task exposes (the encoder's last level)."""
    return network.visual.out_channels[-1]
