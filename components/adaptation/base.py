"""The method interface: what the ``adapt`` stage, the sweeps and the comparison talk to.

A method is an ``nn.Module`` that holds every trainable part it adds to the pretrained network
(its student, heads, discriminators) and any state it keeps (an EMA teacher, banks). The
``adapt`` phase drives it the same way whatever the method:

    method = METHODS[name](network, cfg, task, upstream)
    loss, logs = method.step(source_batch, target_batch, generator)   # one training step
    loss.backward(); optimizer.step()                                  # over method.trainable()
    method.after_step()                                                # EMA teacher, banks
    method.extra_state()                          # non-tensor state, saved every epoch
    method.inference_network()                                         # what ``evaluate`` runs

Batches are the task's (``components.tasks``): the source batch carries its labels; the target
batch never carries target ground truth (its ``mask`` is the semantic-based masks of the
``masks`` stage when the method requires them, all-background otherwise). Per-sample upstream
outputs ride along in the batches: ``category`` (both domains) and ``common`` (target) when the
method requires ``semantics``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from components.adaptation.configs import MethodSection
from components.tasks import Task

#: what a method may require from upstream stages
UPSTREAM = ("semantics", "masks")


@dataclass(frozen=True)
class Upstream:
    """Upstream outputs aligned with the rows of the source / target training splits."""

    source_categories: np.ndarray | None = None  # (N_s,) int64, CSM categories
    target_categories: np.ndarray | None = None  # (N_t,) int64
    target_common: np.ndarray | None = None  # (N_t,) bool, reliable target samples

    def batch_fields(self, domain: str, rows: np.ndarray) -> dict[str, torch.Tensor]:
        """The per-sample fields a ``domain`` batch of ``rows`` carries."""
        out = {}
        cats = self.source_categories if domain == "source" else self.target_categories
        if cats is not None:
            out["category"] = torch.from_numpy(np.array(cats[rows]))
        if domain == "target" and self.target_common is not None:
            out["common"] = torch.from_numpy(np.array(self.target_common[rows]))
        return out


class AdaptationMethod(nn.Module):
    """Base class of every entry of ``components.adaptation.registry.METHODS``."""

    #: the method's params section class (``adapt.<name>``)
    Config: ClassVar[type[MethodSection]]
    #: upstream stage outputs the method reads (a subset of ``UPSTREAM``)
    requires: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, network: nn.Module, cfg: MethodSection, task: Task, upstream: Upstream):
        super().__init__()
        if not isinstance(cfg, self.Config):
            raise TypeError(f"{type(self).__name__} needs a {self.Config.__name__}")
        self.cfg = cfg
        self.task = task
        self.student = network

    def trainable(self) -> list[nn.Parameter]:
        """Parameters the optimizer updates (never a teacher's)."""
        return [p for n, p in self.named_parameters() if not n.startswith("teacher.")]

    def step(self, src: dict, tgt: dict, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
        """One training step's loss on a (source, target) pair of batches, and its logs."""
        raise NotImplementedError

    def after_step(self) -> None:
        """State updates after the optimizer step (EMA teacher, banks); default: none."""

    def extra_state(self) -> dict:
        """State outside parameters and buffers (e.g. SDA's FIFO memory bank) as plain
        containers of tensors, saved in every epoch checkpoint; default: none."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        """Restore :meth:`extra_state` on resume."""

    def inference_network(self) -> nn.Module:
        """The network ``evaluate`` runs: by default the student."""
        return self.student

    def teacher_network(self) -> nn.Module | None:
        """A mean teacher, if the method keeps one (for label-free model selection)."""
        return getattr(self, "teacher", None)
