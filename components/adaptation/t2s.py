"""T2S-DA (``papers/t2s-da-pulling-target-to-source.txt``): pull pseudo-target features to the
source ones, on a DACS self-training base.

Per step (Sec. 3): (1) the source batch restyled with the target batch's low-frequency Fourier
amplitude (FDA) is a *pseudo-target* batch that keeps the source labels; (2) queries are the
student's projected features of pseudo-target pixels, sampled class-balanced (CBQS: per class
in proportion to its share of the batch's labelled pixels, at least one); (3) the positive key
of a class-c query is the teacher's source prototype of c (mean of its projected source
pixels, Eq. 5); (4) negatives, domain-equalised (DENPS): half from teacher source pixels of
other classes, half from unreliable teacher target pixels (confidence in the lowest
``unreliable`` share, predicted not c); (5) InfoNCE (or MSE to the positive), each class's
queries weighted by the teacher's target confidence deficit of that class (dynamic
re-weighting). Total: source loss + DACS target loss + ``weight`` x pulling loss; the
cross-entropy on pseudo-target images is off by default (``pseudo_ce``: the paper's Tab. 7
finds that adding it lowers the target score).

Choices where the text lost the symbols (all "assumed" in params.yaml): temperature 0.2,
unreliable share 0.2, 256 queries and 256 negatives per query, FDA band 0.05, re-weighting
``w_c = (1 - conf_c) / mean_c(1 - conf_c)`` over the classes present. The projector is two
1x1 conv + ReLU layers over the task's pixel features (the paper: two Conv-BN-ReLU blocks).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from components.adaptation.configs import T2SConfig
from components.adaptation.sda.cfb import ema_update
from components.adaptation.self_training import (
    MeanTeacherMethod,
    downsample_labels,
    fda,
    pseudo_labels,
)
from components.data.dataset import IGNORE_INDEX


def projector(channels: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(channels, channels, 1), nn.ReLU(), nn.Conv2d(channels, channels, 1)
    )


def balanced_query_counts(labels: torch.Tensor, total: int) -> dict[int, int]:
    """CBQS: queries per class in proportion to its labelled pixels, at least one each."""
    valid = labels[labels != IGNORE_INDEX]
    classes, counts = valid.unique(return_counts=True)
    share = counts.float() / counts.sum().clamp_min(1)
    return {
        int(c): max(1, int(round(total * float(s)))) for c, s in zip(classes, share, strict=True)
    }


def pick(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """At most ``k`` rows of ``x`` drawn uniformly without replacement."""
    if len(x) <= k:
        return x
    return x[torch.randperm(len(x), generator=gen)[:k].to(x.device)]


def infonce(q: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, t: float) -> torch.Tensor:
    """Per-query InfoNCE (M,) for queries q (M, C), one positive pos (C,), negatives (N, C);
    all L2-normalised."""
    lp = (q @ pos / t).unsqueeze(1)  # (M, 1)
    ln = q @ neg.T / t if len(neg) else q.new_zeros(len(q), 0)
    return -(lp - torch.logsumexp(torch.cat([lp, ln], 1), 1, keepdim=True))[:, 0]


class T2S(MeanTeacherMethod):
    Config = T2SConfig

    def __init__(self, network, cfg, task, upstream):
        super().__init__(network, cfg, task, upstream)
        channels = task.model.hidden
        self.proj = projector(channels)
        self.teacher_proj = copy.deepcopy(self.proj).requires_grad_(False)

    def trainable(self):
        return [p for n, p in self.named_parameters() if not n.startswith(("teacher.", "teacher_"))]

    def after_step(self) -> None:
        super().after_step()
        ema_update(self.teacher_proj, self.proj, self.cfg.ema)

    def embed(self, net: nn.Module, proj: nn.Module, out: dict) -> torch.Tensor:
        return F.normalize(proj(self.task.pixel_features(out)), dim=1)  # (B, C, h, w)

    def step(self, src, tgt, gen):
        cfg, task = self.cfg, self.task
        out_s = task.forward(self.student, src)
        loss_src = task.supervised_loss(out_s, src)
        # (1) pseudo-target: source content, target low-frequency style, source labels
        pseudo = {**src, "image": fda(src["image"], tgt["image"], cfg.fda_band)}
        n = len(pseudo["image"])
        pseudo = {k: v[:n] if torch.is_tensor(v) else v for k, v in pseudo.items()}
        out_p = task.forward(self.student, pseudo)
        loss_tgt, logs = self.target_loss(src, tgt, gen)
        loss_pull, pull_logs = self.pull(src, pseudo, tgt, out_p, gen)
        total = loss_src + cfg.target_weight * loss_tgt + cfg.weight * loss_pull
        if cfg.pseudo_ce:  # the paper's Tab. 7 finds this term lowers the target score
            loss_pseudo = task.supervised_loss(out_p, pseudo)
            total = total + loss_pseudo
            logs["l_pseudo"] = loss_pseudo.item()
        logs.update({"l_src": loss_src.item(), "l_pull": loss_pull.item()})
        logs.update(pull_logs)
        return total, logs

    def pull(self, src, pseudo, tgt, out_p, gen) -> tuple[torch.Tensor, dict]:
        cfg, task = self.cfg, self.task
        q_feat = self.embed(self.student, self.proj, out_p)  # (B, C, h, w)
        size = q_feat.shape[-2:]
        c = q_feat.shape[1]
        labels_q = downsample_labels(task.class_labels(pseudo), size)
        with torch.no_grad():
            tch_s, tch_t = self.teach(src), self.teach(tgt)
            k_src = self.embed(self.teacher, self.teacher_proj, tch_s)
            k_tgt = self.embed(self.teacher, self.teacher_proj, tch_t)
            labels_s = downsample_labels(task.class_labels(src), size)
            pl_t, conf_t, _ = pseudo_labels(task, tch_t)
            pl_t = downsample_labels(pl_t, size)
            conf_t = F.interpolate(conf_t[:, None], size=size, mode="nearest")[:, 0]
        flat = lambda f: f.permute(0, 2, 3, 1).reshape(-1, c)  # noqa: E731
        qf, ql = flat(q_feat), labels_q.reshape(-1)
        sf, sl = flat(k_src), labels_s.reshape(-1)
        tf, tl, tc = flat(k_tgt), pl_t.reshape(-1), conf_t.reshape(-1)
        cut = torch.quantile(tc, cfg.unreliable)
        unreliable = tc <= cut
        # dynamic re-weighting: classes the teacher is least confident about on target
        present = [int(k) for k in ql.unique() if k != IGNORE_INDEX]
        deficit = {}
        for k in present:
            sel = tl == k
            deficit[k] = 1.0 - (tc[sel].mean().item() if sel.any() else 0.0)
        mean_def = max(1e-6, sum(deficit.values()) / max(1, len(deficit)))
        losses, weights, used = [], [], 0
        for k, count in balanced_query_counts(labels_q, cfg.queries).items():
            pos_src = sf[sl == k]
            if len(pos_src) == 0:
                continue  # no source prototype of this class in the batch
            queries = pick(qf[ql == k], count, gen)
            proto = F.normalize(pos_src.mean(0), dim=0)
            neg_s = pick(sf[(sl != k) & (sl != IGNORE_INDEX)], cfg.negatives // 2, gen)
            neg_t = pick(tf[unreliable & (tl != k)], cfg.negatives - len(neg_s), gen)
            neg = torch.cat([neg_s, neg_t])
            if cfg.objective == "infonce":
                per = infonce(queries, proto, neg, cfg.temperature)
            else:
                per = (queries - proto).pow(2).sum(1)
            w = deficit[k] / mean_def if cfg.reweight else 1.0
            losses.append(per.mean() * w)
            weights.append(w)
            used += len(queries)
        if not losses:
            return qf.sum() * 0.0, {"queries": 0.0}
        return torch.stack(losses).sum() / max(1e-6, sum(weights)), {"queries": float(used)}
