"""SDA stage 3: Dual Adaptive Branches, ``L_sda = L_ct + lambda1 L_cfb + lambda2 L_ho`` (Eq. 7).

One training step sees a labeled source batch and an unlabeled target batch. The student is
the base network plus an auxiliary decoder (RRB) and an MI discriminator; the mean teacher is
an EMA copy of the base network that supplies the domain-based target pseudo masks and the
features stored in the memory bank. Every ablation row of Tables 3 and 5 is a switch of
:class:`~components.adaptation.configs.SDAConfig` (``adapt.sda``). Referring task only: its
categories come from the queries' words (``semantics`` stage) and its target masks from the
``masks`` stage.

Conventions (assumed): contrast and hierarchical optimisation run on feature-map cells; a cell
is foreground / background when more than half of its pixels are. Only *common* categories take
part in the contrast (source categories, and reliable target samples assigned to them);
unknown target categories and zero-target source samples only provide background pixels.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from components.adaptation.base import AdaptationMethod, Upstream
from components.adaptation.configs import SDAConfig
from components.adaptation.sda.cfb import (
    MemoryBank,
    ema_update,
    info_nce,
    masked_mean,
    pixel_features,
    pseudo_masks,
)
from components.adaptation.sda.rrb import (
    MIDiscriminator,
    hierarchical_loss_source,
    hierarchical_loss_target,
)
from components.losses import multiscale_bce
from components.models.decoder import MultiScaleDecoder
from components.tasks import Task


def cells(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) bool/float mask -> (B, h, w) bool: cells more than half covered."""
    return F.adaptive_avg_pool2d(mask.float().unsqueeze(1), size)[:, 0] > 0.5


def anchor_cells(mask: torch.Tensor, size: tuple[int, int], rule: str) -> torch.Tensor:
    """CFB's anchor cells (B, h, w) bool of a (B, H, W) mask at the feature resolution.

    ``majority``: cells more than half covered (a thin or small object may have none);
    ``majority_or_peak``: also, in a sample whose mask has no such cell, its best-covered cell,
    so every object that is in the mask gives the contrast at least one anchor.
    """
    cover = F.adaptive_avg_pool2d(mask.float().unsqueeze(1), size)[:, 0]
    out = cover > 0.5
    if rule == "majority_or_peak":
        flat = cover.flatten(1)
        peak = F.one_hot(flat.argmax(1), flat.shape[1]).view_as(cover).bool()
        lonely = ~out.flatten(1).any(1) & (flat.amax(1) > 0)
        out = out | (peak & lonely.view(-1, 1, 1))
    return out


def sentence(out: dict) -> torch.Tensor:
    """Mean encoded query over real words (B, C): the ``Q`` side of Eq. 6."""
    m = out["word_mask"].unsqueeze(-1).float()
    return (out["query"] * m).sum(1) / m.sum(1).clamp_min(1)


def common_categories(upstream: Upstream) -> torch.Tensor:
    """(k_s,) bool: the source categories that have reliable target samples."""
    # copies: the arrays may be read-only views of Ray's object store
    src_cat = torch.tensor(upstream.source_categories)
    tgt_cat = torch.tensor(upstream.target_categories)
    tgt_common = torch.tensor(upstream.target_common)
    k_s = int(src_cat.max()) + 1
    common_set = torch.zeros(k_s, dtype=torch.bool)
    common_set[tgt_cat[tgt_common & (tgt_cat < k_s)].unique()] = True
    return common_set


class SDA(AdaptationMethod):
    """Trainable parts: ``student`` (the base network), ``aux`` decoder, ``phi``."""

    Config = SDAConfig
    requires = frozenset({"semantics", "masks"})

    def __init__(self, network: nn.Module, cfg: SDAConfig, task: Task, upstream: Upstream):
        super().__init__(network, cfg, task, upstream)
        hidden, scales = task.model.hidden, task.model.scales
        self.aux = MultiScaleDecoder(hidden, scales)
        self.phi = MIDiscriminator(hidden, hidden)
        self.teacher = copy.deepcopy(network).requires_grad_(False)
        self.bank = MemoryBank(cfg.memory_size)
        self.register_buffer("common_set", common_categories(upstream), persistent=False)

    def forward_base(self, net, batch):
        """The base network on ``batch`` through the task (a training student sees the source
        batch's erased words when the network is DMMI; the eval-mode teacher never does)."""
        return self.task.forward(net, batch)

    def step(self, src: dict, tgt: dict, gen=None):
        """One step's loss and its parts.

        Args:
            src: source batch (``mask`` = A^s, ``category``: (B,) CSM categories); tgt: target
                batch whose ``mask`` holds the semantic-based masks A-bar^t (never target
                ground truth), with ``category`` and ``common`` (reliable samples).
        """
        cfg = self.cfg
        src_cat, tgt_cat, tgt_common = src["category"], tgt["category"], tgt["common"]
        common_set = self.common_set
        out_s, out_t = self.forward_base(self.student, src), self.forward_base(self.student, tgt)
        self.teacher.eval()
        with torch.no_grad():
            tch_s, tch_t = (
                self.forward_base(self.teacher, src),
                self.forward_base(self.teacher, tgt),
            )
        logs: dict[str, float] = {}

        # Eq. 5: main decoder on source annotations, auxiliary decoder on target masks
        loss_ct = multiscale_bce(out_s["logits"], out_s["full_logits"], src["mask"])
        if (loss_base := self.task.auxiliary_loss(out_s, src)) is not None:  # DMMI's terms
            loss_ct = loss_ct + loss_base
            logs["l_base_aux"] = loss_base.item()
        fg_t, bg_t = pseudo_masks(tch_t["response"], cfg.gamma_max, cfg.gamma_min)  # A^t
        if cfg.rrb and cfg.ct:
            aux_mask = tgt["mask"] if cfg.reciprocal_masks else fg_t.float()
            aux_logits, _ = self.aux(out_t["enhanced"])
            aux_full = F.interpolate(aux_logits[0], size=aux_mask.shape[-2:], mode="bilinear")
            # a semantic mask the `masks` stage dropped (its classifier did not believe the
            # category) is no evidence of background: such samples can be left out
            keep = torch.ones(len(aux_mask), dtype=torch.bool, device=aux_mask.device)
            if cfg.reciprocal_masks and cfg.dropped_masks == "ignore":
                keep = aux_mask.flatten(1).any(1)
            logs["l_aux"] = 0.0
            if keep.any():
                loss_aux = multiscale_bce(
                    [lg[keep] for lg in aux_logits], aux_full[keep, 0], aux_mask[keep]
                )
                loss_ct = loss_ct + loss_aux
                logs["l_aux"] = loss_aux.item()
            if cfg.reciprocal_masks and cfg.dropped_masks == "ignore":
                logs["aux_samples"] = float(keep.sum())
        total = loss_ct
        logs["l_ct"] = loss_ct.item()

        if cfg.cfb:
            loss_cfb, parts = self._cfb(
                out_s,
                out_t,
                tch_s,
                tch_t,
                src,
                fg_t,
                bg_t,
                src_cat,
                tgt_cat,
                tgt_common,
                common_set,
                gen,
            )
            total = total + cfg.lambda1 * loss_cfb
            logs.update(parts)

        if cfg.rrb and cfg.ho:
            f_s, f_t = out_s["fused"][0], out_t["fused"][0]
            size = f_s.shape[-2:]
            loss_ho = hierarchical_loss_source(
                self.phi, sentence(out_s), f_s, cells(src["mask"], size)
            )
            loss_ho = loss_ho + hierarchical_loss_target(
                self.phi, sentence(out_t), f_t, cells(fg_t, size), cells(tgt["mask"], size)
            )
            total = total + cfg.lambda2 * loss_ho
            logs["l_ho"] = loss_ho.item()
        return total, logs

    def _cfb(
        self,
        out_s,
        out_t,
        tch_s,
        tch_t,
        src,
        fg_t,
        bg_t,
        src_cat,
        tgt_cat,
        tgt_common,
        common_set,
        gen,
    ):
        """Eq. 4 in both directions, with the memory bank; returns (loss, logs)."""
        cfg = self.cfg
        size = out_s["features"].shape[-2:]
        src_fg, src_bg = anchor_cells(src["mask"], size, cfg.anchors), cells(1 - src["mask"], size)
        tgt_fg, tgt_bg = anchor_cells(fg_t, size, cfg.anchors), cells(bg_t, size)
        # only common categories carry foreground identity
        s_ok = (src_cat >= 0) & common_set[src_cat.clamp_min(0)]
        t_ok = tgt_common & (tgt_cat < len(common_set))
        src_fg_c = src_fg & s_ok.view(-1, 1, 1)
        tgt_fg_c = tgt_fg & t_ok.view(-1, 1, 1)
        logs = {"pseudo_fg_cells": float(tgt_fg.sum()), "empty_pseudo": float(not tgt_fg.any())}

        def keys(feats, fg, bg, cat, domain):
            kf, ki = pixel_features(feats, fg, cfg.pixels, gen)
            bf, _ = pixel_features(feats, bg, cfg.pixels, gen)
            k = [kf, bf]
            c = [cat[ki], torch.full((len(bf),), -1, device=bf.device, dtype=torch.long)]
            if cfg.memory:
                mf, mc = self.bank.get(domain, bf.device)
                if len(mf):
                    k.append(mf)
                    c.append(mc)
            return torch.cat(k), torch.cat(c)

        a_s, ai_s = pixel_features(out_s["features"], src_fg_c, cfg.pixels, gen)
        k_t, kc_t = keys(tch_t["features"], tgt_fg_c, tgt_bg, tgt_cat, "target")
        l_st, n_st = info_nce(
            a_s, src_cat[ai_s], k_t, kc_t, cfg.contrast_temperature, cfg.contrastive
        )
        a_t, ai_t = pixel_features(out_t["features"], tgt_fg_c, cfg.pixels, gen)
        k_s, kc_s = keys(tch_s["features"], src_fg_c, src_bg, src_cat, "source")
        l_ts, n_ts = info_nce(
            a_t, tgt_cat[ai_t], k_s, kc_s, cfg.contrast_temperature, cfg.contrastive
        )
        if cfg.memory:  # teacher features: stable entries
            for feats, fg, cat, ok, domain in (
                (tch_s["features"], src_fg_c, src_cat, s_ok, "source"),
                (tch_t["features"], tgt_fg_c, tgt_cat, t_ok, "target"),
            ):
                mean, nonempty = masked_mean(feats, fg)
                keep = nonempty & ok
                self.bank.push(domain, F.normalize(mean[keep], dim=1), cat[keep])
        logs.update({"l_cfb": (l_st + l_ts).item(), "anchors_st": n_st, "anchors_ts": n_ts})
        return l_st + l_ts, logs

    @torch.no_grad()
    def after_step(self) -> None:
        ema_update(self.teacher, self.student, self.cfg.ema)

    def extra_state(self) -> dict:
        return {"bank": self.bank.state()}

    def load_extra_state(self, state: dict) -> None:
        if state:
            self.bank.load(state["bank"])
