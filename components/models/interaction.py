"""Cross-modal interaction of the base network (SDA Appendix A, Eqs. 8 and 9).

Eq. 8: ``alpha = softmax(g1(V) g2(Q)^T)``, ``V_bar = alpha Q``, ``V_q = tanh(g3(V_bar)) * V``.
Eq. 9: region max-pooling of ``V_q`` over SLIC superpixels, then region self-attention
``softmax(g_q(V_r) g_k(V_r)^T) g_v(V_r)``; each pixel adds its region's context: ``F = V_q + V_r``.

Choices the paper leaves open: attention logits are scaled by 1/sqrt(C) (as in Transformers);
two normalised coordinate channels are appended to V before projection so that spatial
relations ("left of") are expressible; padded words and empty regions are masked out.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def coord_channels(b: int, h: int, w: int, device) -> torch.Tensor:
    ys = torch.linspace(-1, 1, h, device=device).view(1, 1, h, 1).expand(b, 1, h, w)
    xs = torch.linspace(-1, 1, w, device=device).view(1, 1, 1, w).expand(b, 1, h, w)
    return torch.cat([xs, ys], dim=1)  # (B, 2, H, W)


def region_max_pool(x: torch.Tensor, labels: torch.Tensor, num_regions: int):
    """Max of pixel features per region.

    Args:
        x: (B, P, C) pixel features.
        labels: (B, P) region id of each pixel, in [0, num_regions).
    Returns:
        (B, R, C) region features (0 for empty regions) and a (B, R) bool mask of non-empty ones.
    """
    b, _, c = x.shape
    out = x.new_full((b, num_regions, c), float("-inf"))
    idx = labels.unsqueeze(-1).expand(-1, -1, c)
    out = out.scatter_reduce(1, idx, x, reduce="amax", include_self=True)
    valid = torch.isfinite(out[..., 0])
    return torch.where(valid.unsqueeze(-1), out, torch.zeros_like(out)), valid


class Interaction(nn.Module):
    """One interaction block at one resolution; returns F and the word attention alpha."""

    def __init__(self, vis_channels: int, hidden: int, num_regions: int):
        super().__init__()
        self.proj = nn.Conv2d(vis_channels + 2, hidden, 1)
        self.g1 = nn.Linear(hidden, hidden)
        self.g2 = nn.Linear(hidden, hidden)
        self.g3 = nn.Linear(hidden, hidden)
        self.gq = nn.Linear(hidden, hidden)
        self.gk = nn.Linear(hidden, hidden)
        self.gv = nn.Linear(hidden, hidden)
        self.num_regions = num_regions
        self.scale = 1.0 / math.sqrt(hidden)

    def forward(self, v, q, word_mask, superpixels):
        """
        Args:
            v: (B, C_v, H, W) visual features; q: (B, N, C) query features;
            word_mask: (B, N) True for real words; superpixels: (B, H0, W0) region ids.
        Returns:
            f: (B, C, H, W) enhanced features; alpha: (B, H*W, N) pixel-to-word attention.
        """
        b, _, h, w = v.shape
        v = self.proj(torch.cat([v, coord_channels(b, h, w, v.device)], dim=1))
        if v.requires_grad:
            # oneDNN's conv backward can crash on the channels-last gradient this view would
            # send back (seen with torch 2.13 CPU): hand it a contiguous one.
            v.register_hook(lambda g: g.contiguous())
        vf = v.flatten(2).transpose(1, 2)  # (B, P, C)
        logits = self.g1(vf) @ self.g2(q).transpose(1, 2) * self.scale  # (B, P, N)
        alpha = logits.masked_fill(~word_mask.unsqueeze(1), float("-inf")).softmax(-1)
        v_bar = alpha @ q  # (B, P, C)
        vq = torch.tanh(self.g3(v_bar)) * vf  # (B, P, C)

        labels = F.interpolate(superpixels.unsqueeze(1).float(), size=(h, w), mode="nearest")
        labels = labels.long().flatten(1)  # (B, P)
        vr, valid = region_max_pool(vq, labels, self.num_regions)  # (B, R, C), (B, R)
        att = self.gq(vr) @ self.gk(vr).transpose(1, 2) * self.scale  # (B, R, R)
        att = att.masked_fill(~valid.unsqueeze(1), float("-inf")).softmax(-1)
        vr_bar = att @ self.gv(vr)  # (B, R, C)
        ctx = torch.gather(vr_bar, 1, labels.unsqueeze(-1).expand(-1, -1, vr_bar.shape[-1]))
        f = (vq + ctx).transpose(1, 2).reshape(b, -1, h, w).contiguous()  # (B, C, H, W)
        return f, alpha
