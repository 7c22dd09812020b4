"""The semantic-segmentation base network: the referring network's visual encoder and decoder,
without a query. Each of the last ``scales`` encoder levels is projected to ``hidden``
channels (1x1 conv) in place of the vision-language interaction; the same multi-scale FCN
decoder then gives C-class logits at every scale (finest first).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from components.config import ModelConfig
from components.models.decoder import MultiScaleDecoder
from components.models.visual import build_visual


class SemanticSegNet(nn.Module):
    def __init__(self, cfg: ModelConfig, num_classes: int):
        super().__init__()
        self.visual = build_visual(cfg)
        self.scales = cfg.scales
        self.num_classes = num_classes
        chans = self.visual.out_channels[-cfg.scales :]
        self.project = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, cfg.hidden, 1), nn.ReLU()) for c in chans
        )
        self.decoder = MultiScaleDecoder(cfg.hidden, cfg.scales, num_classes)

    def forward(self, image) -> dict:
        """
        Args:
            image: (B, 3, H, W).
        Returns:
            logits: finest-first list of (B, C, H_i, W_i); full_logits: (B, C, H, W) at image
            resolution; features: (B, C_last, h, w) last encoder layer; enhanced: the projected
            levels (B, hidden, H_i, W_i); fused: the decoder's inputs after its top-down path.
        """
        feats = self.visual(image)[-self.scales :]
        fs = [p(v) for p, v in zip(self.project, feats, strict=True)]
        logits, fused = self.decoder(fs)
        full = F.interpolate(logits[0], size=image.shape[-2:], mode="bilinear")
        return {
            "logits": logits,
            "full_logits": full,
            "features": feats[-1],
            "enhanced": fs,
            "fused": fused,
        }
