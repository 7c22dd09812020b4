"""DIDA (``papers/dida-dual-level-interaction.txt``): semantic- and instance-level
self-training with a labeled instance bank and pseudo-label regeneration.

We follow the paper, not its public release (which switches temperature and regeneration off,
fills the bank from one image, uses a 3x3 neighbourhood that wraps across rows and decays
absent classes toward zero):

* **Instance bank** (Sec. III-E): ``bank_size`` K source pixel features with their labels,
  class-balanced (``K // C`` slots per class), initialised as random unit vectors. Every
  ``bank_interval`` u steps each class present in the source batch refreshes its slots by EMA
  (``bank_momentum``) from the teacher's features of its *boundary* pixels (Algorithm 1: a pixel
  whose 3x3 neighbourhood, clipped at the image border, holds another label) and the *centre*
  (mean) of its non-boundary pixels. A class absent from the batch keeps its slots unchanged.
* **Instance-level predictions** (Sec. III-C): ``softmax(cos(f, bank) / t)`` over the K slots.
* **Scattering / gathering** (Sec. III-D, Eq. 10): the teacher's class probabilities z are
  scattered to the K slots (``z_sc[k] = z[label(k)]``) and the instance pseudo-label becomes
  ``q_hat ∝ q ⊙ z_sc`` (agreeing levels sharpen, disagreeing ones flatten; assumed form, the
  text lost the equation); the instance predictions gathered per class (``q_ga[c] = Σ_{label(k)
  = c} q[k]``) regenerate the semantic pseudo-label ``z_hat = phi z + (1 - phi) q_ga``.
* **Losses**: ``L = L_src + target_weight L_tgt + lambda_ins L_ins``: L_tgt is the student on a
  strongly augmented target view against ``argmax z_hat`` of the weak view, weighted by the
  DACS confidence quality; L_ins the cross-entropy of the student's instance predictions on the
  strong view against ``q_hat``. Pixel features are the task's, at feature resolution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from components.adaptation.configs import DIDAConfig
from components.adaptation.self_training import (
    MeanTeacherMethod,
    downsample_labels,
    pixel_ce,
    quality_weight,
)
from components.data.dataset import IGNORE_INDEX


def boundary_mask(labels: torch.Tensor) -> torch.Tensor:
    """Algorithm 1: (B, h, w) labels -> (B, h, w) bool, True where the 3x3 neighbourhood
    (clipped at the border, never wrapping to the next row) holds another label."""
    x = labels[:, None].float()
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    windows = F.unfold(padded, 3)  # (B, 9, h*w)
    centre = x.flatten(2)  # (B, 1, h*w)
    diff = (windows != centre).any(1)
    return diff.view_as(labels)


def scatter(z: torch.Tensor, bank_labels: torch.Tensor) -> torch.Tensor:
    """(N, C) class probabilities -> (N, K): each slot takes its class's probability."""
    return z[:, bank_labels]


def gather(q: torch.Tensor, bank_labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N, K) instance probabilities -> (N, C): summed over the slots of each class."""
    out = q.new_zeros(len(q), num_classes)
    return out.index_add_(1, bank_labels, q)


def regenerate(z: torch.Tensor, q: torch.Tensor, bank_labels: torch.Tensor, phi: float):
    """Scattering / gathering: (semantic pseudo-label z_hat (N, C), instance q_hat (N, K))."""
    q_hat = q * scatter(z, bank_labels)
    q_hat = q_hat / q_hat.sum(1, keepdim=True).clamp_min(1e-12)
    z_hat = phi * z + (1 - phi) * gather(q, bank_labels, z.shape[1])
    return z_hat, q_hat


def strong_view(image: torch.Tensor, strength: float, gen: torch.Generator) -> torch.Tensor:
    """Colour jitter (per-image brightness / contrast / channel gains) and Gaussian noise on
    normalised images (B, 3, H, W): the strong view (no torchvision needed)."""
    b = len(image)

    def u(*shape):
        return (torch.rand(*shape, generator=gen) * 2 - 1).to(image.device)

    mean = image.mean((1, 2, 3), keepdim=True)
    contrast = 1 + strength * u(b, 1, 1, 1)
    gains = 1 + 0.5 * strength * u(b, 3, 1, 1)
    bright = strength * u(b, 1, 1, 1)
    noise = 0.5 * strength * torch.randn(image.shape, generator=gen).to(image.device)
    return (image - mean) * contrast * gains + mean + bright + noise


class InstanceBank(torch.nn.Module):
    """Class-balanced labeled bank: ``per_class`` unit features for each of ``num_classes``."""

    def __init__(self, num_classes: int, per_class: int, dim: int, momentum: float, gen=None):
        super().__init__()
        feats = F.normalize(torch.randn(num_classes * per_class, dim, generator=gen), dim=1)
        self.register_buffer("features", feats)  # (K, C)
        self.register_buffer("labels", torch.arange(num_classes).repeat_interleave(per_class))
        self.per_class = per_class
        self.momentum = momentum

    @torch.no_grad()
    def update(self, features: torch.Tensor, labels: torch.Tensor, gen: torch.Generator) -> int:
        """EMA-refresh each present class's slots from its boundary pixels and the centre of
        its non-boundary pixels. ``features`` (B, C, h, w), ``labels`` (B, h, w) with the
        ignore index. Returns the number of slots refreshed."""
        c = features.shape[1]
        flat = F.normalize(features.permute(0, 2, 3, 1).reshape(-1, c), dim=1)
        lab = labels.reshape(-1)
        edge = boundary_mask(labels).reshape(-1)
        refreshed = 0
        for k in lab.unique().tolist():
            if k == IGNORE_INDEX or k * self.per_class >= len(self.labels):
                continue
            mine = lab == k
            cands = [flat[mine & edge]]
            inner = flat[mine & ~edge]
            if len(inner):
                cands.append(F.normalize(inner.mean(0, keepdim=True), dim=1))
            cand = torch.cat(cands)
            if len(cand) == 0:
                continue
            pick = torch.randint(len(cand), (self.per_class,), generator=gen).to(cand.device)
            slots = slice(k * self.per_class, (k + 1) * self.per_class)
            new = self.momentum * self.features[slots] + (1 - self.momentum) * cand[pick]
            self.features[slots] = F.normalize(new, dim=1)
            refreshed += self.per_class
        return refreshed

    def predict(self, features: torch.Tensor, temperature: float) -> torch.Tensor:
        """(N, C) features -> (N, K) instance-level probabilities."""
        sim = F.normalize(features, dim=1) @ self.features.T
        return (sim / temperature).softmax(1)


class DIDA(MeanTeacherMethod):
    Config = DIDAConfig

    def __init__(self, network, cfg, task, upstream):
        super().__init__(network, cfg, task, upstream)
        per_class = max(1, cfg.bank_size // task.num_classes)
        gen = torch.Generator().manual_seed(0)
        self.bank = InstanceBank(
            task.num_classes, per_class, task.model.hidden, cfg.bank_momentum, gen
        )
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def step(self, src, tgt, gen):
        cfg, task = self.cfg, self.task
        out_s = task.forward(self.student, src)
        loss_src = task.supervised_loss(out_s, src)
        logs = {"l_src": loss_src.item()}
        if int(self.steps) % cfg.bank_interval == 0:
            with torch.no_grad():
                feats = task.pixel_features(self.teach(src))
                labels = downsample_labels(task.class_labels(src), feats.shape[-2:])
                logs["bank_refreshed"] = float(self.bank.update(feats, labels, gen))

        # weak view -> teacher: semantic and instance-level pseudo-labels
        with torch.no_grad():
            tch = self.teach(tgt)
            z = task.class_logits(tch).softmax(1)  # (B, C, H, W)
            feats_t = task.pixel_features(tch)  # (B, D, h, w)
            size = feats_t.shape[-2:]
            z_small = F.interpolate(z, size=size, mode="bilinear")
            n_c, d = z.shape[1], feats_t.shape[1]
            zf = z_small.permute(0, 2, 3, 1).reshape(-1, n_c)
            qf = self.bank.predict(feats_t.permute(0, 2, 3, 1).reshape(-1, d), cfg.temperature)
            if cfg.regenerate:
                z_hat, q_hat = regenerate(zf, qf, self.bank.labels, cfg.phi)
                # the regenerated semantic label at image resolution
                z_hat_map = z_hat.view(len(z), *size, n_c).permute(0, 3, 1, 2)
                z_full = F.interpolate(z_hat_map, size=z.shape[-2:], mode="bilinear")
            else:
                q_hat, z_full = qf, z
            conf, pl = z_full.max(1)
            weight = quality_weight(conf, cfg.threshold)

        # strong view -> student
        strong = {**tgt, "image": strong_view(tgt["image"], cfg.strength, gen)}
        out_t = task.forward(self.student, strong)
        loss_tgt = pixel_ce(task, out_t, pl, weight.view(-1, 1, 1).expand_as(pl))
        f_st = task.pixel_features(out_t).permute(0, 2, 3, 1).reshape(-1, d)
        q_st = self.bank.predict(f_st, cfg.temperature)
        loss_ins = -(q_hat * q_st.clamp_min(1e-12).log()).sum(1).mean()
        total = loss_src + cfg.target_weight * loss_tgt + cfg.lambda_ins * loss_ins
        logs.update(
            {
                "l_tgt": loss_tgt.item(),
                "l_ins": loss_ins.item(),
                "pseudo_quality": weight.mean().item(),
            }
        )
        return total, logs

    def after_step(self) -> None:
        super().after_step()
        self.steps += 1
