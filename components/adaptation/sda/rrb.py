"""Reciprocal Relation Branch (SDA Section 3.3.2, Eqs. 5 and 6).

* Collaborative training (Eq. 5): the shared encoder feeds the main decoder, trained on source
  annotations, and an auxiliary decoder trained on the semantic-based target masks, so the
  coarser target masks never reach the main decoder.
* Hierarchical optimisation (Eq. 6): mutual information between the query and region features,
  estimated with a discriminator ``phi`` and softplus (the Jensen-Shannon estimator of Hjelm et
  al.): ``MI(a, b+, b-) = E[-softplus(-phi(a, b+))] - E[softplus(phi(a, b-))]``. On target:
  instance (intersection of the two masks) vs category (union), and category vs background;
  on source: foreground vs background. The loss is the negative MI.

Choices (assumed): ``phi`` is bilinear between the mean query feature and a region's mean
fused feature; a region that is empty in a sample drops that sample from that term.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MIDiscriminator(nn.Module):
    """phi(a, b) = a^T W b (bilinear score)."""

    def __init__(self, query_dim: int, region_dim: int):
        super().__init__()
        self.bilinear = nn.Bilinear(query_dim, region_dim, 1)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.bilinear(a, b).squeeze(-1)  # (B,)


def mutual_information(phi: MIDiscriminator, a, b_pos, b_neg, valid) -> torch.Tensor:
    """Eq. 6 JSD estimate over the samples where ``valid`` (B,) is True (0 if none)."""
    if not bool(valid.any()):
        return a.sum() * 0.0
    a, b_pos, b_neg = a[valid], b_pos[valid], b_neg[valid]
    return (-F.softplus(-phi(a, b_pos))).mean() - F.softplus(phi(a, b_neg)).mean()


def region_means(features: torch.Tensor, masks: list[torch.Tensor]):
    """Mean feature of each mask: features (B, C, h, w), masks list of (B, h, w) bool ->
    list of ((B, C) means, (B,) non-empty)."""
    out = []
    for m in masks:
        w = m.float().unsqueeze(1)
        area = w.sum((2, 3))
        out.append(((features * w).sum((2, 3)) / area.clamp_min(1), area.squeeze(1) > 0))
    return out


def hierarchical_loss_target(phi, query, features, domain_mask, semantic_mask):
    """-L_ho^t: instance vs category and category vs background on target.

    Args:
        query: (B, C_q) sentence feature; features: (B, C, h, w);
        domain_mask / semantic_mask: (B, h, w) bool (A^t, the semantic-based mask).
    """
    inst = domain_mask & semantic_mask
    cat = domain_mask | semantic_mask
    (v_sel, ok_sel), (v_ct, ok_ct), (v_bg, ok_bg) = region_means(features, [inst, cat, ~cat])
    mi = mutual_information(phi, query, v_sel, v_ct, ok_sel & ok_ct) + mutual_information(
        phi, query, v_ct, v_bg, ok_ct & ok_bg
    )
    return -mi


def hierarchical_loss_source(phi, query, features, mask):
    """-L_ho^s: foreground vs background on source."""
    (v_fg, ok_fg), (v_bg, ok_bg) = region_means(features, [mask, ~mask])
    return -mutual_information(phi, query, v_fg, v_bg, ok_fg & ok_bg)
