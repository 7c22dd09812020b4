"""Semantic-based target masks (SDA Section 3.3.2, Appendix B.2, Eq. 12).

An independent multi-label classifier over the ``k_t + k_u`` target categories (global average
pooling of a CNN's last features, a linear layer, sigmoid; the BCE of Eq. 12). Its class
activation map for a sample's category, normalised to [0, 1], is refined into a mask.

Refinement (assumed, lighter than IRN's random walk): the CAM is averaged inside each SLIC
superpixel, so the mask snaps to image regions, then thresholded at ``fg_threshold`` (0.30, the
IRN foreground threshold). Its IoU against the held-back target ground truth is measured and
reported as a diagnostic only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from components.models.visual import ConvEncoder


class MultiLabelClassifier(nn.Module):
    """Independent network; ``encoder_state`` initialises its CNN (the paper starts from an
    ImageNet ResNet-101; we start from a copy of the stage-1 visual encoder, assumed)."""

    def __init__(self, num_classes: int, widths: list[int], encoder_state: dict | None = None):
        super().__init__()
        self.encoder = ConvEncoder(widths)
        if encoder_state is not None:
            self.encoder.load_state_dict(encoder_state)
        self.classifier = nn.Conv2d(widths[-1], num_classes, 1)  # a linear layer per pixel

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns image logits (B, K) and class activation maps (B, K, h, w)."""
        cams = self.classifier(self.encoder(image)[-1])
        return cams.mean((2, 3)), cams  # GAP then linear == linear then GAP


def multilabel_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Eq. 12: binary cross-entropy over categories; labels (B, K) in {0, 1}."""
    return F.binary_cross_entropy_with_logits(logits, labels)


@torch.no_grad()
def category_cam(cams: torch.Tensor, category: torch.Tensor, size: tuple[int, int]):
    """CAM of each sample's category, upsampled to ``size`` and min-max scaled to [0, 1].

    Min-max rather than ReLU-then-max: with many categories most class maps are negative
    everywhere, and ReLU would leave nothing to threshold.
    """
    cam = cams[torch.arange(len(category)), category].unsqueeze(1)
    cam = F.interpolate(cam, size=size, mode="bilinear", align_corners=False)[:, 0]
    lo = cam.flatten(1).amin(1).view(-1, 1, 1)
    hi = cam.flatten(1).amax(1).view(-1, 1, 1)
    return (cam - lo) / (hi - lo).clamp_min(1e-6)


def superpixel_refine(cam: torch.Tensor, superpixels: torch.Tensor, fg_threshold: float):
    """Average the CAM (B, H, W) within each superpixel (B, H, W) and threshold it."""
    b, h, w = cam.shape
    labels = superpixels.reshape(b, -1)
    r = int(labels.max()) + 1
    sums = torch.zeros(b, r, device=cam.device).scatter_add_(1, labels, cam.reshape(b, -1))
    counts = torch.zeros(b, r, device=cam.device).scatter_add_(
        1, labels, torch.ones_like(sums[:, :1]).expand(-1, labels.shape[1])
    )
    region = sums / counts.clamp_min(1)
    return (torch.gather(region, 1, labels) > fg_threshold).reshape(b, h, w)
