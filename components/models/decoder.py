"""FCN decoder (SDA Appendix C.2): 3x3, 3x3 and 1x1 convolutions with a residual connection.

One head per resolution gives the multi-scale response maps of Eq. 10. A top-down path adds the
upsampled coarser features to each finer level first (our choice; the paper only says the
interaction is stacked over resolutions), so the finest map sees the deeper context.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FCNHead(nn.Module):
    def __init__(self, hidden: int, out_channels: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.conv2 = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.out = nn.Conv2d(hidden, out_channels, 1)

    def forward(self, x):
        y = F.relu(self.conv1(x))
        y = F.relu(self.conv2(y) + x)  # residual connection
        return self.out(y)  # (B, out_channels, H, W) logits


class MultiScaleDecoder(nn.Module):
    """One head per scale: a response map (1 channel, referring) or C class logits."""

    def __init__(self, hidden: int, scales: int, out_channels: int = 1):
        super().__init__()
        self.heads = nn.ModuleList(FCNHead(hidden, out_channels) for _ in range(scales))

    def forward(self, feats):
        """feats: finest-first list of (B, C, H_i, W_i) -> finest-first list of logits."""
        fused = list(feats)
        for i in range(len(fused) - 2, -1, -1):
            up = F.interpolate(fused[i + 1], size=fused[i].shape[-2:], mode="bilinear")
            fused[i] = fused[i] + up
        return [head(f) for head, f in zip(self.heads, fused, strict=True)], fused


def referring_outputs(decoder: MultiScaleDecoder, enhanced: list, size, **parts) -> dict:
    """The output dict every referring base network returns: the decoder on its inputs
    ``enhanced`` (finest first), logits upsampled to the image ``size``, and ``parts`` (``words``,
    ``query``, ``word_mask``, ``alphas``, ``features``); ``alpha`` is the last of ``alphas``."""
    logits, fused = decoder(enhanced)
    full = F.interpolate(logits[0], size=size, mode="bilinear")
    return {
        "logits": logits,
        "full_logits": full[:, 0],
        "response": torch.sigmoid(full[:, 0]),
        **parts,
        "alpha": parts["alphas"][-1],
        "enhanced": enhanced,
        "fused": fused,
    }
