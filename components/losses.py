"""Losses shared by training phases. Method-specific losses live with their method."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def multiscale_bce(logits: list[torch.Tensor], full_logits: torch.Tensor, mask: torch.Tensor):
    """Eq. 10 of SDA Appendix A, averaged over scales.

    Each scale's logits (B, 1, H_i, W_i) are compared with the mask area-downsampled to that
    scale (a soft target: the fraction of foreground pixels in each cell); the finest map,
    upsampled to image size (``full_logits``, (B, H, W)), is compared with the full mask too.

    Args:
        logits: finest-first list of (B, 1, H_i, W_i); mask: (B, H, W) in {0, 1}.
    """
    m = mask.unsqueeze(1)
    losses = [F.binary_cross_entropy_with_logits(full_logits, mask)]
    for lg in logits:
        target = F.adaptive_avg_pool2d(m, lg.shape[-2:])
        losses.append(F.binary_cross_entropy_with_logits(lg, target))
    return torch.stack(losses).mean()
