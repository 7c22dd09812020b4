"""Semantic-based target masks (SDA Section 3.3.2, Appendix B.2, Eq. 12).

An independent multi-label classifier over the ``k_t + k_u`` target categories (a CNN's last
features, a linear layer per cell, pooling into image logits, sigmoid; the BCE of Eq. 12; the
pooling is a log-sum-exp in place of CAM's global average, see ``MultiLabelClassifier``), trained on
image-level multi-hot labels: the categories of all the queries of an image. Its class
activation map for a sample's category, normalised as CAM / IRN do (ReLU, then division by
the maximum), is refined into a mask, and dropped when the classifier does not believe the
category is in the image (its sigmoid score below ``score_threshold``).

The CAM comes at a quarter of the image's resolution (16 x 16 at 64 px): the classifier's
last stage keeps its input's resolution (stride 1 in place of 2, same weights), as CAM / IRN
drop the last stride of their ResNet; at 1/8 an object of 6 % of the image covers about four
CAM cells.

Refinement (assumed, lighter than IRN's random walk): the CAM is averaged inside each SLIC
superpixel, so the mask snaps to image regions, then thresholded at ``fg_threshold`` (0.30, the
IRN foreground threshold). Its IoU against the held-back target ground truth is measured and
reported as a diagnostic only.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score
from torch import nn

from components.models.visual import ConvEncoder


class MultiLabelClassifier(nn.Module):
    """Independent network; ``encoder_state`` initialises its CNN (the paper starts from an
    ImageNet ResNet-101; we start from a copy of the stage-1 visual encoder, assumed).
    ``last_stride`` 1 keeps the last stage at its input's resolution (finer CAMs).

    ``prior`` (K,), each category's share of the training images, sets the classifier's biases
    to its log-odds, so training starts from the label prior's loss instead of from every score
    at one half (the prior-probability initialisation of RetinaNet). Measured on benchmark v4:
    from a zero bias, 5 epochs do not even get the 54-odd rare categories' scores down to their
    frequencies (loss above the prior's) and the score check keeps no mask.

    ``pooling`` of the class maps into image logits: ``lse`` (log-sum-exp, a soft maximum with
    sharpness ``lse_r``), ``gap`` (CAM's global average) or ``max``. Which one puts the maps on
    the objects depends on the data (measured): with one object per image whose category is
    its colour, GAP's maps are lower on the object than around it (with GroupNorm every cell
    sees the whole image's statistics, so a category can be read off the background) and a
    soft maximum's lie on it; on benchmark v4's shape categories it is the other way round.
    The stage's label-free val mAP does not tell them apart: on the colour case GAP classifies
    better (val mAP 1.0 vs 0.96) with 4 % of its kept mask pixels on the objects (LSE: 98 %).
    """

    def __init__(
        self,
        num_classes: int,
        widths: list[int],
        encoder_state: dict | None = None,
        last_stride: int = 1,
        pooling: str = "lse",
        lse_r: float = 5.0,
        prior: np.ndarray | None = None,
    ):
        super().__init__()
        self.pooling, self.lse_r = pooling, lse_r
        self.encoder = ConvEncoder(widths)
        if encoder_state is not None:
            self.encoder.load_state_dict(encoder_state)
        last = self.encoder.stages[-1]
        for conv in (
            last.body[0],
            *([last.skip[0]] if isinstance(last.skip, nn.Sequential) else []),
        ):
            conv.stride = (last_stride, last_stride)
        self.classifier = nn.Conv2d(widths[-1], num_classes, 1)  # a linear layer per pixel
        if prior is not None:
            p = torch.as_tensor(prior, dtype=torch.float32).clamp(1e-4, 1 - 1e-4)
            with torch.no_grad():
                self.classifier.bias.copy_(torch.log(p / (1 - p)))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns image logits (B, K) and class activation maps (B, K, h, w)."""
        cams = self.classifier(self.encoder(image)[-1])
        if self.pooling == "gap":
            return cams.mean((2, 3)), cams  # GAP then linear == linear then GAP
        if self.pooling == "max":
            return cams.flatten(2).amax(2), cams
        n, r = cams.shape[2] * cams.shape[3], self.lse_r  # a soft maximum over cells
        return (torch.logsumexp(r * cams.flatten(2), 2) - math.log(n)) / r, cams


def multilabel_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Eq. 12: binary cross-entropy over categories; labels (B, K) in {0, 1}."""
    return F.binary_cross_entropy_with_logits(logits, labels)


def multi_hot(image_of: np.ndarray, category: np.ndarray, use: np.ndarray, n_images: int, k: int):
    """Image-level labels (n_images, k) in {0, 1}: the categories of an image's queries.

    ``image_of`` (N,) image position of each query, ``category`` (N,) its category, ``use``
    (N,) bool: whether the query names something in the image (a query the stage-1 model finds
    nothing for contributes no category).
    """
    labels = np.zeros((n_images, k), dtype=np.float32)
    labels[image_of[use], category[use]] = 1.0
    return labels


def label_prior_loss(labels: np.ndarray) -> float:
    """The BCE of always predicting each category's frequency: what a classifier that learned
    nothing from the image reaches."""
    p = labels.mean(0).clip(1e-6, 1 - 1e-6)
    return float(-(labels * np.log(p) + (1 - labels) * np.log(1 - p)).mean())


def mean_average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Multi-label mAP over the categories with at least one positive and one negative."""
    aps = [
        average_precision_score(labels[:, c], scores[:, c])
        for c in range(labels.shape[1])
        if 0 < labels[:, c].sum() < len(labels)
    ]
    return float(np.mean(aps)) if aps else float("nan")


@torch.no_grad()
def category_cam(cams: torch.Tensor, category: torch.Tensor, size: tuple[int, int]):
    """CAM of each sample's category (B,), upsampled to ``size``, ReLU then divided by its
    maximum (all zero where the map has no positive value)."""
    cam = cams[torch.arange(len(category)), category].unsqueeze(1)
    cam = F.relu(F.interpolate(cam, size=size, mode="bilinear", align_corners=False)[:, 0])
    return cam / cam.flatten(1).amax(1).clamp_min(1e-5).view(-1, 1, 1)


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
