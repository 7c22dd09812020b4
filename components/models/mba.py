"""Multi-scale Bi-directional Attention (MBA) of DMMI (Section 3.1.2, Eqs. 1-6).

Text-to-image (Eqs. 2-4): the pixel-word affinities of Eq. 1 are summed over an r x r window
around each pixel before the softmax over words, for every window side in ``windows``
(paper: 1, 3, 5); the per-window attentions are mixed with learned weights (Eq. 3) and read
the words' values (Eq. 4). Image-to-text (Eqs. 5-6): the word-pixel affinities are summed over
the span of ``s`` tokens starting at each word (paper: 1, 2, 3) before the softmax over pixels,
mixed the same way, and read the pixels' values.

Choices the paper leaves open: the scale weights lambda are a softmax over one free parameter
per scale (so they sum to one and start uniform); windows are zero-padded at the image border
(a border pixel sums the positions inside the image) and spans stop at the last real word;
both outputs are added residually to their inputs (V* through a 1x1 conv back to the encoder's
width, so it can go on to the next encoder stage); two coordinate channels are appended to V as
in SDA's interaction, so that spatial relations ("left of") are expressible.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from components.models.interaction import coord_channels


def window_sum(x: torch.Tensor, k: int) -> torch.Tensor:
    """Sum over the k x k window centred at each position (zeros beyond the border).

    Args:
        x: (B, L, H, W) affinities, one map per word; k: an odd window side.
    Returns:
        (B, L, H, W).
    """
    if k == 1:
        return x
    return F.avg_pool2d(x, k, stride=1, padding=k // 2, count_include_pad=True) * (k * k)


def span_sum(x: torch.Tensor, s: int) -> torch.Tensor:
    """Sum over the ``s`` consecutive tokens starting at each token (zeros past the end).

    Args:
        x: (B, L, P) affinities, zero at padded words so spans stop at the last real word.
    Returns:
        (B, L, P).
    """
    n = x.shape[1]
    padded = F.pad(x, (0, 0, 0, s - 1))  # (B, L + s - 1, P)
    return sum(padded[:, d : d + n] for d in range(s))


def mix_scales(atts: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """Eq. 3: ``sum_r lambda_r W_att^r`` with ``lambda = softmax(weights)``."""
    lam = weights.softmax(0)
    return sum(lam[r] * a for r, a in enumerate(atts))


class MBA(nn.Module):
    """One MBA block at one encoder stage: refines visual features V and words E together."""

    def __init__(self, vis_channels: int, hidden: int, windows: list[int], spans: list[int]):
        super().__init__()
        self.windows, self.spans = list(windows), list(spans)
        self.proj = nn.Conv2d(vis_channels + 2, hidden, 1)
        self.q_a, self.k_a, self.v_a = (nn.Linear(hidden, hidden) for _ in range(3))  # W^alpha
        self.q_b, self.k_b, self.v_b = (nn.Linear(hidden, hidden) for _ in range(3))  # W^beta
        self.lambda_a = nn.Parameter(torch.zeros(len(self.windows)))
        self.lambda_b = nn.Parameter(torch.zeros(len(self.spans)))
        self.v_out = nn.Conv2d(hidden, vis_channels, 1)
        self.e_out = nn.Linear(hidden, hidden)
        self.scale = 1.0 / math.sqrt(hidden)

    def scale_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(lambda^alpha over windows, lambda^beta over spans), each summing to one."""
        return self.lambda_a.softmax(0), self.lambda_b.softmax(0)

    def forward(self, v: torch.Tensor, e: torch.Tensor, word_mask: torch.Tensor):
        """
        Args:
            v: (B, C_v, H, W) encoder stage output; e: (B, L, C) word features;
            word_mask: (B, L) True for real words.
        Returns:
            v_new: (B, C_v, H, W) V + V* (Eq. 4); e_new: (B, L, C) E + E* (Eq. 6), zero at
            padded words; alpha: (B, H*W, L) the mixed text-to-image attention W_att^alpha.
        """
        b, _, h, w = v.shape
        x = self.proj(torch.cat([v, coord_channels(b, h, w, v.device)], dim=1))
        if x.requires_grad:
            # the same oneDNN conv-backward workaround as SDA's interaction block
            x.register_hook(lambda g: g.contiguous())
        xf = x.flatten(2).transpose(1, 2)  # (B, P, C)
        pad = ~word_mask  # (B, L)

        # text-to-image, Eqs. 2-4
        aff = self.q_a(xf) @ self.k_a(e).transpose(1, 2) * self.scale  # (B, P, L)
        maps = aff.transpose(1, 2).reshape(b, -1, h, w)  # (B, L, H, W)
        atts = [
            window_sum(maps, k).flatten(2).transpose(1, 2).masked_fill(pad.unsqueeze(1), -torch.inf)
            for k in self.windows
        ]
        alpha = mix_scales([a.softmax(-1) for a in atts], self.lambda_a)  # (B, P, L)
        v_star = alpha @ self.v_a(e)  # (B, P, C)
        v_star = v_star.transpose(1, 2).reshape(b, -1, h, w).contiguous()
        v_new = v + self.v_out(v_star)

        # image-to-text, Eqs. 5-6
        aff_b = self.q_b(e) @ self.k_b(xf).transpose(1, 2) * self.scale  # (B, L, P)
        aff_b = aff_b.masked_fill(pad.unsqueeze(-1), 0.0)
        beta = mix_scales([span_sum(aff_b, s).softmax(-1) for s in self.spans], self.lambda_b)
        e_star = beta @ self.v_b(xf)  # (B, L, C)
        e_new = (e + self.e_out(e_star)) * word_mask.unsqueeze(-1)
        return v_new, e_new, alpha
