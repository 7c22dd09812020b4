"""Plain PyTorch training and inference steps, shared by Ray Train workers and benchmarks.

Nothing here knows about Ray or MLflow (STYLE.md #4): the stage wraps these in a worker loop.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Literal

import numpy as np
import torch

from components.config import TrainConfig
from components.data.dataset import SplitArrays, iterate_batches, network_inputs, to_batch
from components.metrics import referring_metrics
from components.models.network import predict_masks

#: a training phase's ``amp`` param (``TrainConfig.amp``)
Amp = bool | Literal["auto"]


def make_optimizer(model, cfg: TrainConfig, steps_total: int):
    """Adam with linear warm-up to ``cfg.lr`` then linear decay to 0 (SDA Appendix C.2).

    ``model`` is a module or an iterable of parameters.
    """
    params = model.parameters() if isinstance(model, torch.nn.Module) else model
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warm = max(1, min(cfg.warmup_steps, steps_total // 2))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (steps_total - step) / max(1, steps_total - warm))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


@functools.cache
def cpu_bf16_native() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX) and oneDNN may use it
    (``ONEDNN_MAX_CPU_ISA`` can cap it below). Without it, CPU autocast is emulated: ten times
    slower than float32 on an AVX2 CPU (measured on the default network); oneDNN's own check
    alone also passes on AVX-512 CPUs without BF16, which emulate it too."""
    hardware = any(
        getattr(torch.cpu, check, lambda: False)()
        for check in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    )
    return hardware and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively: a CUDA GPU with bfloat16 units (Ampere
    or newer; not one that emulates it), or a CPU per :func:`cpu_bf16_native`."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cpu" and cpu_bf16_native()


def use_amp(device: torch.device, amp: Amp) -> bool:
    """A phase's ``amp`` param on ``device``: ``True`` / ``False`` as given; ``"auto"``
    bfloat16 exactly where the device computes it natively (:func:`native_bf16`), float32
    elsewhere. Each worker decides for its own device."""
    if amp == "auto":
        return native_bf16(device)
    return bool(amp)


def precision(device: torch.device, amp: Amp) -> str:
    """What a training step on ``device`` computes in under ``amp``: bfloat16 or float32."""
    return "bfloat16" if use_amp(device, amp) else "float32"


def autocast(device: torch.device, amp: Amp):
    """bfloat16 mixed precision for a training step when ``amp`` (a phase's ``amp`` param,
    resolved by :func:`use_amp`), on a GPU or a CPU: convolutions and matmuls in bfloat16,
    reductions and losses in float32. bfloat16 needs no loss scaling. On a CPU it pays where
    the CPU computes bfloat16 natively (AMX, AVX512-BF16: 1.4x the float32 training pass of
    the default network, ``benchmarks/stage_times.py`` measures a whole run); elsewhere it is
    emulated and slower, which ``"auto"`` never picks."""
    if use_amp(device, amp) and device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def zero_interleaved_order(is_zero: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """DMMI's sampler: a permutation of ``range(len(is_zero))`` in which the one-to-zero
    samples sit at evenly spaced slots (zero ``k`` of ``z`` at ``floor((k + 1/2) n / z)``), so
    consecutive ones are at most ``ceil(n / z)`` apart; each group is shuffled by ``rng``."""
    n = len(is_zero)
    zeros = rng.permutation(np.flatnonzero(is_zero))
    others = rng.permutation(np.flatnonzero(~is_zero))
    slots = np.zeros(n, dtype=bool)
    if len(zeros):
        slots[((np.arange(len(zeros)) + 0.5) * n / len(zeros)).astype(np.int64)] = True
    order = np.empty(n, dtype=np.int64)
    order[slots], order[~slots] = zeros, others
    return order


def epoch_batches(
    data: SplitArrays,
    indices: np.ndarray,
    batch_size: int,
    rng: np.random.Generator,
    zero_interleave: bool,
) -> Iterator[np.ndarray]:
    """Positions into ``indices``, one array per batch: a seeded shuffle, or with
    ``zero_interleave`` (``model.zero_interleave``) :func:`zero_interleaved_order` where a
    sample is one-to-zero when its ground-truth mask is empty."""
    if not zero_interleave:
        yield from iterate_batches(len(indices), batch_size, shuffle=True, rng=rng)
        return
    order = zero_interleaved_order(~data.has_mask()[indices], rng)
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def train_epoch(
    task,
    model,
    opt,
    sched,
    data: SplitArrays,
    indices: np.ndarray,
    batch_size: int,
    device: torch.device,
    rng: np.random.Generator,
    amp: Amp = False,
    on_batch: Callable[[float], None] | None = None,
    extra_loss: Callable[[dict, dict, np.ndarray], torch.Tensor] | None = None,
) -> dict[str, float]:
    """One pass of the task's supervised loss (referring: L_seg, Eq. 10) over ``indices`` of
    ``data``; returns mean loss and count.

    ``extra_loss(out, batch, rows)`` adds a method's term (e.g. SDA's L_si) to every step;
    ``rows`` are the batch's row numbers in ``data``. Batches come from :func:`epoch_batches`;
    ``task.training_inputs`` adds what only training feeds the network (DMMI's erased words,
    whose auxiliary losses ``task.supervised_loss`` then adds).
    """
    model.train()
    total, count = 0.0, 0
    for batch_idx in epoch_batches(data, indices, batch_size, rng, task.model.zero_interleave):
        batch = to_batch(data, indices[batch_idx], device)
        batch = task.training_inputs(batch, data, indices[batch_idx], rng)
        with autocast(device, amp):
            out = task.forward(model, batch)
            loss = task.supervised_loss(out, batch)
            if extra_loss is not None:
                loss = loss + extra_loss(out, batch, indices[batch_idx])
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss {loss.item()}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        total += loss.item() * len(batch_idx)
        count += len(batch_idx)
        if on_batch:
            on_batch(loss.item())
    return {"loss": total / max(1, count), "samples": count}


@torch.no_grad()
def predict(model, data: SplitArrays, batch_size: int, device, empty_threshold: float):
    """Boolean masks (N, H, W) and scores (N,) for every sample of ``data``."""
    model.eval()
    masks, scores = [], []
    for idx in iterate_batches(len(data), batch_size, shuffle=False):
        batch = to_batch(data, idx, device)
        args, kwargs = network_inputs(batch)
        out = model(*args, **kwargs)
        m, s = predict_masks(out["response"].float(), empty_threshold)
        masks.append(m.cpu().numpy())
        scores.append(s.cpu().numpy())
    return np.concatenate(masks), np.concatenate(scores)


def val_metrics(model, data: SplitArrays, device, empty_threshold: float) -> dict[str, float]:
    """The per-epoch validation row of every training phase: val_oiou, val_miou, val_map."""
    m = evaluate(model, data, 64, device, empty_threshold)
    return {f"val_{k}": m[k] for k in ("oiou", "miou", "map")}


def evaluate(model, data: SplitArrays, batch_size: int, device, empty_threshold: float):
    """Referring metrics of ``model`` on ``data`` (see ``metrics.referring_metrics``)."""
    masks, scores = predict(model, data, batch_size, device, empty_threshold)
    return referring_metrics(list(masks), list(data.masks), list(scores))


@torch.no_grad()
def unsupervised_metrics(
    student, teacher, data: SplitArrays, device, empty_threshold: float, batch_size: int = 64
) -> dict[str, float]:
    """Model-selection criteria that read no target labels (sweeps without target annotations).

    * ``unsup_confidence``: 1 - mean binary entropy (in bits) of the student's response map;
      1 = every pixel predicted with certainty.
    * ``unsup_agreement``: overall IoU between the student's and the teacher's predicted masks
      (pseudo-label agreement); samples where both predict nothing are left out. Only when
      the method keeps a teacher (``teacher`` not None).
    """
    student.eval()
    if teacher is not None:
        teacher.eval()
    entropy, pixels, inter, union = 0.0, 0, 0, 0
    for idx in iterate_batches(len(data), batch_size, shuffle=False):
        batch = to_batch(data, idx, device)
        args, kwargs = network_inputs(batch)
        p = student(*args, **kwargs)["response"].float().clamp(1e-6, 1 - 1e-6)
        h = -(p * p.log2() + (1 - p) * (1 - p).log2())
        entropy += h.sum().item()
        pixels += h.numel()
        if teacher is not None:
            ms, _ = predict_masks(p, empty_threshold)
            mt, _ = predict_masks(teacher(*args, **kwargs)["response"].float(), empty_threshold)
            inter += (ms & mt).sum().item()
            union += (ms | mt).sum().item()
    out = {"unsup_confidence": 1.0 - entropy / max(1, pixels)}
    if teacher is not None:
        out["unsup_agreement"] = inter / union if union else 1.0
    return out
