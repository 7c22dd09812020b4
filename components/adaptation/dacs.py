"""DACS (Tranheden et al., 2021): mean-teacher self-training on ClassMix images.

Each step: the supervised loss on the source batch, plus the student on target images with
pasted source classes against the EMA teacher's pseudo-labels, each target image weighted by
the share of its pixels the teacher predicts above ``threshold`` (the confidence quality of
DACS / DAFormer). The strong baseline DIDA and T2S-DA build on.
"""

from __future__ import annotations

from components.adaptation.configs import DACSConfig
from components.adaptation.self_training import MeanTeacherMethod


class DACS(MeanTeacherMethod):
    Config = DACSConfig

    def step(self, src, tgt, gen):
        loss_src = self.task.supervised_loss(self.task.forward(self.student, src), src)
        loss_tgt, logs = self.target_loss(src, tgt, gen)
        total = loss_src + self.cfg.target_weight * loss_tgt
        return total, {"l_src": loss_src.item(), **logs}
