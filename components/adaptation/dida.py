"""DIDA (``papers/dida-dual-level-interaction.txt``): semantic- and instance-level
self-training with a labeled instance bank and pseudo-label regeneration.

We follow the paper, not its public release (which switches temperature and regeneration off,
fills the bank from one image, uses a 3x3 neighbourhood that wraps across rows and decays
absent classes toward zero):

* **Instance bank** (Sec. III-E): ``bank_size`` K source pixel features with their labels,
  class-balanced (``K // C`` slots per class); the first source batch showing a class fills
  its slots with randomly selected instance embeddings of it (the teacher's). Every
  ``bank_interval`` u steps, Eq. 11: each class present moves its slots by EMA
  (``bank_momentum``) toward the average of the mean of its *boundary* pixels (Algorithm 1: a
  3x3 receptive field, clipped at the image border, holding more than ``sigma`` classes) and
  the centre (mean; the paper: a k-means centre) of its other pixels. A class absent from the
  batch keeps its slots. Assumed for our short schedule: u = 5 and momentum 0.99 (paper: 50 and
  0.999 over 40k iterations; scaled so the bank moves about as much over ~375 steps) and
  ``sigma`` = 1 (paper: 2, for 19-class street scenes; with 2 classes on the referring task
  and 1-4 objects per image no pixel would ever be a boundary).
* **Instance-level predictions** (Sec. III-C): ``softmax(cos(f, bank) / t)`` over the K slots.
* **Scattering / gathering** (Sec. III-D, Eq. 10): the teacher's class probabilities z are
  scattered to the K slots (``z_sc[k] = z[label(k)]``) and the instance pseudo-label becomes
  ``q_hat ∝ q ⊙ z_sc`` (agreeing levels sharpen, disagreeing ones flatten; assumed form, the
  text lost the equation); the instance predictions gathered per class (``q_ga[c] = Σ_{label(k)
  = c} q[k]``) regenerate the semantic pseudo-label ``z_hat = phi z + (1 - phi) q_ga``, at
  image resolution (q_ga upsampled from the feature grid).
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


def boundary_mask(labels: torch.Tensor, sigma: int = 1) -> torch.Tensor:
    """Algorithm 1: (B, h, w) labels -> (B, h, w) bool, True where the 3x3 receptive field
    (clipped at the border, never wrapping to the next row) holds more than ``sigma``
    distinct classes; the ignore index is not a class."""
    x = labels[:, None].float()
    centre = x.flatten(2)  # (B, 1, h*w)
    windows = F.unfold(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3)  # (B, 9, h*w)
    windows = torch.where(windows == IGNORE_INDEX, centre, windows)
    distinct = torch.ones_like(windows[:, 0])
    for k in range(1, 9):  # a window entry unlike every earlier one is a new class
        new = (windows[:, k : k + 1] != windows[:, :k]).all(1)
        distinct = distinct + new.float()
    return (distinct > sigma).view_as(labels) & (labels != IGNORE_INDEX)


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
    """Class-balanced labeled bank: ``per_class`` unit features for each of ``num_classes``.

    Slots start as random unit vectors; the first batch that shows a class fills its slots
    with randomly selected instance embeddings of that class (Sec. III-E); later updates
    follow Eq. 11.
    """

    def __init__(
        self, num_classes: int, per_class: int, dim: int, momentum: float, sigma: int = 1, gen=None
    ):
        super().__init__()
        feats = F.normalize(torch.randn(num_classes * per_class, dim, generator=gen), dim=1)
        self.register_buffer("features", feats)  # (K, C)
        self.register_buffer("labels", torch.arange(num_classes).repeat_interleave(per_class))
        self.register_buffer("filled", torch.zeros(num_classes, dtype=torch.bool))
        self.per_class = per_class
        self.momentum = momentum
        self.sigma = sigma

    @torch.no_grad()
    def update(self, features: torch.Tensor, labels: torch.Tensor, gen: torch.Generator) -> int:
        """Eq. 11 for each class present: ``e <- m e + (1 - m) e_avg``, ``e_avg`` the mean of
        the class's boundary-pixel mean and its non-boundary centre (either alone when the
        other is absent). A class shown for the first time fills its slots with its own
        instances instead. ``features`` (B, C, h, w); ``labels`` (B, h, w) with the ignore
        index. Classes absent from the batch keep their slots. Returns slots changed."""
        c = features.shape[1]
        flat = F.normalize(features.permute(0, 2, 3, 1).reshape(-1, c), dim=1)
        lab = labels.reshape(-1)
        edge = boundary_mask(labels, self.sigma).reshape(-1)
        changed = 0
        for k in lab.unique().tolist():
            if k == IGNORE_INDEX or k >= len(self.filled):
                continue
            mine = lab == k
            slots = slice(k * self.per_class, (k + 1) * self.per_class)
            if not self.filled[k]:
                pick = torch.randint(int(mine.sum()), (self.per_class,), generator=gen)
                self.features[slots] = flat[mine][pick.to(flat.device)]
                self.filled[k] = True
            else:
                parts = [flat[m].mean(0) for m in (mine & edge, mine & ~edge) if m.any()]
                e_avg = F.normalize(torch.stack(parts).mean(0), dim=0)
                new = self.momentum * self.features[slots] + (1 - self.momentum) * e_avg
                self.features[slots] = F.normalize(new, dim=1)
            changed += self.per_class
        return changed

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
            task.num_classes, per_class, task.model.hidden, cfg.bank_momentum, cfg.sigma, gen
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
                _, q_hat = regenerate(zf, qf, self.bank.labels, cfg.phi)
                # Eq. 10 at image resolution: the gathered instance view upsampled
                q_ga = gather(qf, self.bank.labels, n_c).view(len(z), *size, n_c)
                q_ga = F.interpolate(q_ga.permute(0, 3, 1, 2), size=z.shape[-2:], mode="bilinear")
                z_full = cfg.phi * z + (1 - cfg.phi) * q_ga
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
