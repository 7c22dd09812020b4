"""Mean-teacher self-training parts shared by DACS, T2S-DA and DIDA: teacher pseudo-labels with
DACS's confidence-quality weight, ClassMix, FDA restyling and the pixel losses.

Everything works on the task's class view (``Task.class_logits`` / ``class_labels``), so the
referring task runs as foreground / background.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from components.adaptation.base import AdaptationMethod
from components.adaptation.sda.cfb import ema_update
from components.data.dataset import IGNORE_INDEX
from components.tasks import Task


@torch.no_grad()
def pseudo_labels(task: Task, out: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher output -> (labels (B, H, W), confidence (B, H, W), probabilities (B, K, H, W))."""
    probs = task.class_logits(out).softmax(1)
    conf, labels = probs.max(1)
    return labels, conf, probs


def quality_weight(conf: torch.Tensor, threshold: float) -> torch.Tensor:
    """DACS / DAFormer: per image, the share of pixels whose confidence exceeds ``threshold``
    (B,): the weight of that image's pseudo-labelled pixels."""
    return (conf > threshold).float().flatten(1).mean(1)


def pixel_ce(task: Task, out: dict, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Pixel-weighted cross-entropy of the task's class logits (ignore index excluded)."""
    logits = task.class_logits(out)
    ce = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none")
    valid = (labels != IGNORE_INDEX).float()
    return (ce * weights * valid).sum() / valid.sum().clamp_min(1.0)


def class_mix(task: Task, src: dict, tgt: dict, labels_t, weight_t, gen):
    """ClassMix of source into target (DACS).

    The pasted region comes from ``task.mix_region`` (semantic: half of each source image's
    classes; referring: the referred source object). Mixed labels: the source labels inside
    the region (semantic) or the ignore index there (referring: whether a pasted object is
    referred by the target query is unknown), the target pseudo-labels elsewhere; pixel
    weights 1 inside, the target image's quality weight outside. The mixed batch keeps the
    target's query and superpixels.

    Returns:
        (mixed batch, labels (B, H, W), pixel weights (B, H, W), region (B, H, W) bool)
    """
    region = task.mix_region(src, gen)  # (B, H, W)
    n = min(len(region), len(labels_t))
    region, labels_t, weight_t = region[:n], labels_t[:n], weight_t[:n]
    m = region.unsqueeze(1).float()
    mixed = {k: v[:n] if torch.is_tensor(v) else v for k, v in tgt.items()}
    mixed["image"] = m * src["image"][:n] + (1 - m) * tgt["image"][:n]
    pasted = (
        task.class_labels(src)[:n]
        if task.pasted_label_known
        else torch.full_like(labels_t, IGNORE_INDEX)
    )
    labels = torch.where(region, pasted, labels_t)
    weights = torch.where(
        region,
        torch.ones_like(labels_t, dtype=torch.float),
        weight_t.view(-1, 1, 1).expand_as(labels_t),
    )
    return mixed, labels, weights, region


def fda(source: torch.Tensor, target: torch.Tensor, band: float) -> torch.Tensor:
    """Fourier Domain Adaptation (Yang and Soatto, 2020): the source images (B, 3, H, W) with
    the low-frequency amplitude of the target images, phase kept.

    The square of side ``2 * floor(band * min(H, W)) + 1`` around the zero frequency (centred
    spectrum) takes the target amplitude; at least the zero frequency is swapped.
    """
    n = min(len(source), len(target))
    src, tgt = source[:n].float(), target[:n].float()
    fs, ft = torch.fft.fft2(src), torch.fft.fft2(tgt)
    amp_s, pha_s, amp_t = fs.abs(), fs.angle(), ft.abs()
    amp_s, amp_t = torch.fft.fftshift(amp_s, dim=(-2, -1)), torch.fft.fftshift(amp_t, dim=(-2, -1))
    h, w = src.shape[-2:]
    b = int(band * min(h, w))
    ch, cw = h // 2, w // 2
    amp_s[..., ch - b : ch + b + 1, cw - b : cw + b + 1] = amp_t[
        ..., ch - b : ch + b + 1, cw - b : cw + b + 1
    ]
    amp = torch.fft.ifftshift(amp_s, dim=(-2, -1))
    return torch.fft.ifft2(torch.polar(amp, pha_s)).real.to(source.dtype)


def downsample_labels(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) int labels -> (B, h, w) by nearest neighbour (ignore index kept)."""
    return F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()


class MeanTeacherMethod(AdaptationMethod):
    """A method with an EMA teacher of its student (``cfg.ema``), updated after every step."""

    def __init__(self, network, cfg, task, upstream):
        super().__init__(network, cfg, task, upstream)
        self.teacher = copy.deepcopy(network).requires_grad_(False)

    def after_step(self) -> None:
        ema_update(self.teacher, self.student, self.cfg.ema)

    @torch.no_grad()
    def teach(self, batch: dict) -> dict:
        self.teacher.eval()
        return self.task.forward(self.teacher, batch)

    def target_loss(self, src: dict, tgt: dict, gen) -> tuple[torch.Tensor, dict]:
        """DACS's target term: the student on the ClassMix of ``src`` into ``tgt`` (or on
        ``tgt`` itself when ``cfg.mix`` is off) against the teacher's pseudo-labels, weighted by
        their confidence quality."""
        labels_t, conf, _ = pseudo_labels(self.task, self.teach(tgt))
        weight_t = quality_weight(conf, self.cfg.threshold)
        if getattr(self.cfg, "mix", True):
            batch, labels, weights, region = class_mix(self.task, src, tgt, labels_t, weight_t, gen)
            mixed_share = region.float().mean().item()
        else:
            batch, labels = tgt, labels_t
            weights, mixed_share = weight_t.view(-1, 1, 1).expand_as(labels_t), 0.0
        loss = pixel_ce(self.task, self.task.forward(self.student, batch), labels, weights)
        logs = {
            "l_tgt": loss.item(),
            "pseudo_quality": weight_t.mean().item(),
            "mixed_share": mixed_share,
        }
        return loss, logs
