"""CDANet (``papers/cdanet-context-aware-da.txt``): cross-domain spatial and channel attention
with output-space adversarial training.

Where the paper's parts sit on our network (Sec. 3.1):

* **Features.** E is the student up to its decoder inputs; the attention works on the coarsest
  decoder level (``out["enhanced"][-1]``, ``model.hidden`` channels): 1/8 of the image with the
  default convnet backbone (8x8 on the 64 px benchmark), the paper's 1/8 (1/32 with a ResNet
  backbone, whose last layer is the coarsest decoder input). On the referring task this level
  is already query-conditioned. Sample i of the source batch is paired with sample i of the
  target batch (the paper trains on one pair at a time); the first n = min(B_s, B_t) rows of
  each batch are used. Both domains have ``data.image_size``, so the paired maps
  already match in size (the paper interpolates them).
* **Attention.** Two parallel 1x1 convs give {A_s, A_t} and {B_s, B_t}. CD-SAM (Sec. 3.2,
  Eqs. 1-4): ``Q = q(A_s)``, ``K = k(A_t)`` with C // ``key_reduction`` channels (the paper's
  256 of 2048), ``V = v(A)`` shared by both domains, energy ``Φ = Q^T K`` (N_s x N_t, no
  scaling, as written), Γ_{s→t} its softmax over target positions (Eq. 1), Γ_{t→s} over
  source positions (Eq. 3), ``A'_s = A_s + λ_s V_t Γ_{s→t}^T`` and ``A'_t = A_t + λ_t V_s
  Γ_{t→s}``. CD-CAM (Sec. 3.3, Eqs. 5-8) works on B directly: ``Θ^(i,j)`` is the inner product
  of source channel i and target channel j over the positions, i.e. ``Θ = B_s B_t^T`` (we
  follow the stated indexing; the printed ``B_t B_s^T`` is its transpose), Ψ_{s→t} its softmax
  over j, Ψ_{t→s} over i, ``B'_s = B_s + ξ_s Ψ_{s→t} B_t``, ``B'_t = B_t + ξ_t Ψ_{t→s}^T B_s``.
  Aggregation (Sec. 3.4): ``Z = conv1x1([A', B'])``. Assumed: the 1x1 convs making A, B and V
  start as the identity and the fusion as the mean of A' and B', so that at step 0 the context
  is a residual on the pretrained features (the paper trains all of it from ImageNet weights).
* **Classifier G** is the student's own decoder with its coarsest input replaced by Z, A' or B'
  (its finer inputs are the same image's), giving the task's output at image resolution.
* **Losses** (Eqs. 9-13): the task's supervised loss of G(Z_s), G(A'_s), G(B'_s) on the source
  labels; pixel cross-entropy of G(Z_t), G(A'_t), G(B'_t) against pseudo-labels: the student's
  own target prediction (detached) where its confidence exceeds ``threshold`` (BDL's rule, which
  the paper follows, here online instead of BDL's offline rounds), ignored elsewhere; on the
  referring task this is the foreground / background view (``Task.class_logits``). Three
  discriminators D1-D3 tell source from target class probabilities of G(Z), G(A'), G(B')
  (Eqs. 10, 12). The weights of Eq. 11's six terms are 1, as in the paper. Added: the task's
  supervised loss on the student's own (attention-free) source output, the path ``evaluate``
  runs.
* **Discriminators** (Sec. 4.2): five 4x4 stride-2 convs of ``disc_width`` x (1, 2, 4, 8) and
  1 channels, LeakyReLU(0.2) after all but the last; ``data.image_size >= 32`` leaves them at
  least one output cell. They are trained by the phase's one optimizer over ``trainable()``
  behind a gradient-reversal layer, as DANN's domain classifier: one backward then performs
  Eq. 13's min-max as written (D minimises the cross-entropy of "source" = 1 / "target" = 0,
  i.e. maximises Eq. 10; E and G get the reversed gradient scaled by ``lambda_adv``, pushing
  target outputs toward "source" and source outputs toward "target"). That optimizer is Adam at
  ``adapt.lr``, whose default 1e-4 is the paper's discriminator rate; its betas (0.9, 0.999)
  and warm-up / linear decay are the shared schedule's (paper: betas (0.9, 0.99)). A separate
  method-owned Adam was not chosen: only the phase's optimizer is checkpointed (exact resume)
  and has its gradients averaged over Ray workers (``train_loop.average_gradients``).
* **Restyling.** The paper translates source images with CycleGAN; we restyle each source
  image with the low-frequency amplitude of its paired target image (FDA, ``fda_band``, the
  pipeline's helper ``self_training.fda``) and use the restyled batch for every source term.
* **Inference.** No source image is paired at test time, and ``evaluate`` rebuilds the task's
  plain network from ``model.pt``: ``inference_network()`` is the student itself, i.e. G on
  the unattended features (the context terms dropped). Nothing attends to anything at
  inference, so a prediction depends on its own image (and query) only, never on the batch or
  on a choice of source images; the attention is a training-time module whose gradients shape
  E and G. No state outside parameters is kept.
* **Memory.** Φ has N_s x N_t entries per pair. :func:`chunked_spatial_context` computes it
  ``chunk`` source positions at a time (a first pass accumulates Eq. 3's log-sum-exp over
  source positions, a second applies Eqs. 2 and 4 chunk by chunk), each chunk recomputed in
  backward rather than stored: at most n x ``chunk`` x N_t energy entries exist at once,
  forward and backward, instead of n x N_s x N_t. On the benchmark N = 64: one chunk, exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from components.adaptation.base import AdaptationMethod
from components.adaptation.baselines import grad_reverse
from components.adaptation.configs import CDANetConfig
from components.adaptation.self_training import fda, pixel_ce, pseudo_labels
from components.data.dataset import IGNORE_INDEX

#: attended features -> their discriminator: Z -> D1, A' -> D2, B' -> D3 (Eq. 12)
BRANCHES = ("fused", "spatial", "channel")


# --------------------------------------------------------------------------- CD-SAM, Eqs. 1-4
def spatial_attention(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eqs. 1 and 3 from source queries q (n, d, N_s) and target keys k (n, d, N_t).

    Returns:
        Γ_{s→t} (n, N_s, N_t), each row (a source position) a distribution over target
        positions; Γ_{t→s} (n, N_s, N_t), each column (a target position) a distribution over
        source positions.
    """
    energy = q.transpose(1, 2) @ k  # Φ (n, N_s, N_t)
    return energy.softmax(2), energy.softmax(1)


def spatial_context(
    q: torch.Tensor, k: torch.Tensor, v_s: torch.Tensor, v_t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The context terms of Eqs. 2 and 4 with the whole energy map: ``V_t Γ_{s→t}^T``
    (n, C, N_s) and ``V_s Γ_{t→s}`` (n, C, N_t), for values v_s (n, C, N_s), v_t (n, C, N_t)."""
    g_st, g_ts = spatial_attention(q, k)
    return v_t @ g_st.transpose(1, 2), v_s @ g_ts


def _column_lse(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """(n, N_t): log-sum-exp of a chunk of the energy map over its source positions."""
    return torch.logsumexp(q.transpose(1, 2) @ k, dim=1)


def _chunk_context(q, k, v_s, v_t, lse) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk of source positions: its rows of ``V_t Γ_{s→t}^T`` (n, C, chunk) and its share
    of ``V_s Γ_{t→s}`` (n, C, N_t), Eq. 3's denominator given as ``lse`` (n, N_t)."""
    energy = q.transpose(1, 2) @ k  # (n, chunk, N_t)
    rows = v_t @ energy.softmax(2).transpose(1, 2)
    share = v_s @ torch.exp(energy - lse.unsqueeze(1))
    return rows, share


def _recomputed(fn, *args):
    """``fn(*args)``, recomputed in backward instead of stored when autograd is recording."""
    if torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def chunked_spatial_context(
    q: torch.Tensor, k: torch.Tensor, v_s: torch.Tensor, v_t: torch.Tensor, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`spatial_context` with at most ``chunk`` source positions of the energy map alive
    at once, in forward and in backward (see the module docstring); equal to it up to rounding."""
    n_s = q.shape[-1]
    if n_s <= chunk:
        return spatial_context(q, k, v_s, v_t)
    parts = [slice(i, i + chunk) for i in range(0, n_s, chunk)]
    # Eq. 3 normalises over every source position: its log-denominator first, chunk by chunk
    lse = torch.stack([_recomputed(_column_lse, q[..., p], k) for p in parts]).logsumexp(0)
    rows, ctx_t = [], None
    for p in parts:
        r, share = _recomputed(_chunk_context, q[..., p], k, v_s[..., p], v_t, lse)
        rows.append(r)
        ctx_t = share if ctx_t is None else ctx_t + share
    return torch.cat(rows, dim=2), ctx_t


# --------------------------------------------------------------------------- CD-CAM, Eqs. 5-8
def channel_attention(b_s: torch.Tensor, b_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eqs. 5 and 7 from channel maps b_s, b_t (n, C, N).

    Returns:
        Ψ_{s→t} (n, C, C), each row (a source channel) a distribution over target channels;
        Ψ_{t→s} (n, C, C), each column (a target channel) a distribution over source channels.
    """
    energy = b_s @ b_t.transpose(1, 2)  # Θ (n, C_s, C_t)
    return energy.softmax(2), energy.softmax(1)


def channel_context(b_s: torch.Tensor, b_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The context terms of Eqs. 6 and 8: ``Ψ_{s→t} B_t`` and ``Ψ_{t→s}^T B_s``, (n, C, N)."""
    psi_st, psi_ts = channel_attention(b_s, b_t)
    return psi_st @ b_t, psi_ts.transpose(1, 2) @ b_s


# --------------------------------------------------------------------------- modules
def _identity_conv(cin: int, cout: int) -> nn.Conv2d:
    """A 1x1 conv that starts as the identity (``cin == cout``) or as the mean of
    ``cin // cout`` stacked inputs."""
    conv = nn.Conv2d(cin, cout, 1)
    with torch.no_grad():
        eye = torch.eye(cout).repeat(1, cin // cout) * (cout / cin)
        conv.weight.copy_(eye[:, :, None, None])
        conv.bias.zero_()
    return conv


class CrossDomainAttention(nn.Module):
    """Sec. 3.1-3.4 on a pair of feature maps: {A}, {B} by two parallel 1x1 convs, CD-SAM on
    A, CD-CAM on B, and the fused Z."""

    def __init__(self, channels: int, cfg: CDANetConfig):
        super().__init__()
        keys = max(1, channels // cfg.key_reduction)
        self.to_a = _identity_conv(channels, channels)
        self.to_b = _identity_conv(channels, channels)
        self.query = nn.Conv2d(channels, keys, 1)
        self.key = nn.Conv2d(channels, keys, 1)
        self.value = _identity_conv(channels, channels)
        self.fuse = _identity_conv(2 * channels, channels)
        self.cfg = cfg

    def spatial(self, a_s: torch.Tensor, a_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CD-SAM, Eqs. 2 and 4: (A'_s, A'_t), each (n, C, h, w)."""
        q, k = self.query(a_s).flatten(2), self.key(a_t).flatten(2)  # (n, d, N)
        v_s, v_t = self.value(a_s).flatten(2), self.value(a_t).flatten(2)  # (n, C, N)
        ctx_s, ctx_t = chunked_spatial_context(q, k, v_s, v_t, self.cfg.chunk)
        return (
            a_s + self.cfg.lambda_s * ctx_s.view_as(a_s),
            a_t + self.cfg.lambda_t * ctx_t.view_as(a_t),
        )

    def channel(self, b_s: torch.Tensor, b_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CD-CAM, Eqs. 6 and 8: (B'_s, B'_t), each (n, C, h, w)."""
        ctx_s, ctx_t = channel_context(b_s.flatten(2), b_t.flatten(2))
        return (
            b_s + self.cfg.xi_s * ctx_s.view_as(b_s),
            b_t + self.cfg.xi_t * ctx_t.view_as(b_t),
        )

    def forward(
        self, x_s: torch.Tensor, x_t: torch.Tensor
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Paired features x_s, x_t (n, C, h, w) -> {branch: (source, target)} for the
        ``BRANCHES``: Z (Sec. 3.4), A' (CD-SAM) and B' (CD-CAM)."""
        a_s, a_t = self.spatial(self.to_a(x_s), self.to_a(x_t))
        b_s, b_t = self.channel(self.to_b(x_s), self.to_b(x_t))
        z_s = self.fuse(torch.cat([a_s, b_s], 1))
        z_t = self.fuse(torch.cat([a_t, b_t], 1))
        return {"fused": (z_s, z_t), "spatial": (a_s, a_t), "channel": (b_s, b_t)}


def output_discriminator(classes: int, width: int) -> nn.Sequential:
    """Sec. 4.2: class probabilities (n, K, H, W) -> "source" logits (n, 1, H/32, W/32)."""
    chans = [classes, width, 2 * width, 4 * width, 8 * width]
    layers: list[nn.Module] = []
    for cin, cout in zip(chans[:-1], chans[1:], strict=True):
        layers += [nn.Conv2d(cin, cout, 4, 2, 1), nn.LeakyReLU(0.2)]
    return nn.Sequential(*layers, nn.Conv2d(chans[-1], 1, 4, 2, 1))


def discriminator_loss(d_src: torch.Tensor, d_tgt: torch.Tensor) -> torch.Tensor:
    """Minus Eq. 10 (means over patches): cross-entropy of "source" (1) on the source logits
    and "target" (0) on the target logits; low when the discriminator is right."""
    on_src = F.binary_cross_entropy_with_logits(d_src, torch.ones_like(d_src))
    on_tgt = F.binary_cross_entropy_with_logits(d_tgt, torch.zeros_like(d_tgt))
    return on_src + on_tgt


class CDANet(AdaptationMethod):
    Config = CDANetConfig

    def __init__(self, network, cfg, task, upstream):
        super().__init__(network, cfg, task, upstream)
        self.attention = CrossDomainAttention(task.model.hidden, cfg)
        self.discriminators = nn.ModuleDict(
            {b: output_discriminator(task.num_classes, cfg.disc_width) for b in BRANCHES}
        )

    def decode(self, levels: list[torch.Tensor], coarsest: torch.Tensor, size: torch.Size) -> dict:
        """G: the student's decoder on its inputs ``levels`` (finest first) with the coarsest
        one replaced by ``coarsest`` (n, C, h, w); the task's output dict at image ``size``."""
        logits, _ = self.student.decoder([*levels[:-1], coarsest])
        full = F.interpolate(logits[0], size=size, mode="bilinear")
        # the referring head has one response channel, which its task reads as (n, H, W)
        return {
            "logits": logits,
            "full_logits": full[:, 0] if self.task.name == "referring" else full,
        }

    def step(self, src, tgt, gen):
        """Eqs. 11-13 on the first n = min(B_s, B_t) (source, target) pairs, plus the source
        loss of the student's own output."""
        task, cfg = self.task, self.cfg
        n = min(len(src["image"]), len(tgt["image"]))
        tgt = {k: v[:n] if torch.is_tensor(v) else v for k, v in tgt.items()}
        src = {k: v[:n] if torch.is_tensor(v) else v for k, v in src.items()}
        src["image"] = fda(src["image"], tgt["image"], cfg.fda_band)  # in place of CycleGAN
        out_s, out_t = task.forward(self.student, src), task.forward(self.student, tgt)
        loss_src = task.supervised_loss(out_s, src)
        labels, conf, _ = pseudo_labels(task, out_t)
        labels = torch.where(conf > cfg.threshold, labels, IGNORE_INDEX)  # (n, H, W)
        weights = torch.ones_like(conf)
        lv_s, lv_t = out_s["enhanced"], out_t["enhanced"]
        seg_s = seg_t = adv = 0.0
        for branch, (f_s, f_t) in self.attention(lv_s[-1], lv_t[-1]).items():
            o_s = self.decode(lv_s, f_s, src["image"].shape[-2:])
            o_t = self.decode(lv_t, f_t, tgt["image"].shape[-2:])
            seg_s = seg_s + task.supervised_loss(o_s, src)  # Eq. 11, source terms
            seg_t = seg_t + pixel_ce(task, o_t, labels, weights)  # Eq. 11, target terms
            # Eqs. 10, 12: the discriminator learns at full rate, the network (reversed
            # gradient, scaled by lambda_adv) learns outputs it cannot tell apart
            p_s, p_t = (
                grad_reverse(task.class_logits(o).softmax(1), cfg.lambda_adv) for o in (o_s, o_t)
            )
            disc = self.discriminators[branch]
            adv = adv + discriminator_loss(disc(p_s), disc(p_t))
        total = loss_src + seg_s + seg_t + adv
        logs = {
            "l_src": loss_src.item(),
            "l_seg_src": seg_s.item(),
            "l_seg_tgt": seg_t.item(),
            "l_adv": adv.item(),
            "pseudo_share": (labels != IGNORE_INDEX).float().mean().item(),
        }
        return total, logs
