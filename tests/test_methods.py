"""The method interface contract over every entry of METHODS on both tasks, and the methods'
building blocks on hand-built inputs whose answers are known."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import numpy as np
import pytest
import torch

from components import training
from components.adaptation.base import Upstream
from components.adaptation.baselines import grad_reverse, mmd2
from components.adaptation.configs import METHOD_CONFIGS
from components.adaptation.dida import InstanceBank, boundary_mask, regenerate
from components.adaptation.registry import METHODS
from components.adaptation.self_training import class_mix, fda
from components.config import ModelConfig, TrainConfig
from components.data.dataset import IGNORE_INDEX
from components.metrics import semantic_metrics
from components.tasks import make_task
from components.training import autocast, precision, use_amp
from tests.conftest import ROOT

MCFG = ModelConfig(
    widths=[8, 12, 16, 16], hidden=12, embed_dim=12, num_superpixels=10, dmmi={"ccr_heads": 4}
)
CLASSES = ["background", "circle", "square", "ring"]
B, H = 4, 32


def _batch(task, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    label = torch.zeros(B, H, H, dtype=torch.long)
    label[:, 4:14, 4:14] = 1
    label[:, 18:28, 6:20] = 2
    label[1:, 20:30, 22:30] = 3
    label[0, 0, :] = IGNORE_INDEX
    mask = (label == 1).float()
    return {
        "image": torch.randn(B, 3, H, H, generator=g),
        "tokens": torch.randint(2, 20, (B, 5), generator=g),
        "lengths": torch.full((B,), 5),
        "superpixels": torch.randint(0, 10, (B, H, H), generator=g),
        "mask": mask,
        **({"label": label} if task.name == "semantic" else {}),
    }


def _cases():
    for name in METHODS:
        for task in ("referring", "semantic"):
            if task in METHOD_CONFIGS[name].TASKS:
                yield pytest.param(name, task, "sda", id=f"{name}-{task}")
        if "referring" in METHOD_CONFIGS[name].TASKS:
            yield pytest.param(name, "referring", "dmmi", id=f"{name}-referring-dmmi")


@pytest.mark.parametrize(("name", "task_name", "arch"), list(_cases()))
def test_method_contract(name, task_name, arch):
    """Every method trains every parameter it holds, on either task and either referring base
    network (with DMMI, the source batch's erased words reach the image-to-text branch)."""
    torch.manual_seed(0)
    mcfg = MCFG if arch == "sda" else ModelConfig(**{**MCFG.model_dump(), "arch": arch})
    task = make_task(task_name, mcfg, CLASSES)
    upstream = Upstream(np.array([0, 1, 0, 1]), np.array([0, 1, 0, 1]), np.ones(4, dtype=bool))
    network = task.build_network(20)
    method = METHODS[name](network, METHOD_CONFIGS[name](), task, upstream)
    assert type(method).Config is METHOD_CONFIGS[name]
    fields = upstream.batch_fields
    src = {**_batch(task, 0), **fields("source", np.arange(B))}
    tgt = {**_batch(task, 1), **fields("target", np.arange(B))}
    if arch == "dmmi":  # one erased word per source query, as Task.training_inputs gives
        src["erase"] = torch.zeros_like(src["tokens"], dtype=torch.bool)
        src["erase"][:, 1] = True
    tgt.pop("label", None)  # target ground truth never reaches a method
    tgt["mask"] = torch.zeros_like(tgt["mask"]) if "masks" not in method.requires else tgt["mask"]
    method.train()
    loss, logs = method.step(src, tgt, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and all(np.isfinite(v) for v in logs.values())
    loss.backward()
    trainable = method.trainable()
    missing = [n for n, p in method.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"{name}/{task_name}: no gradient for {missing[:5]}"
    teacher = method.teacher_network()
    if teacher is not None:
        ids = {id(p) for p in trainable}
        assert not any(id(p) in ids for p in teacher.parameters())
        assert all(p.grad is None for p in teacher.parameters())
        before = [p.clone() for p in teacher.parameters()]
        torch.optim.SGD(trainable, lr=0.1).step()
        assert all(torch.equal(b, p) for b, p in zip(before, teacher.parameters(), strict=True))
        method.after_step()  # the EMA moves the teacher toward the updated student
        assert any(not torch.equal(b, p) for b, p in zip(before, teacher.parameters(), strict=True))
    assert method.inference_network() is network


@pytest.mark.parametrize(("name", "task_name", "arch"), list(_cases()))
def test_method_step_under_cpu_bfloat16_autocast(name, task_name, arch):
    """``adapt.amp`` on a CPU: every method's step runs under bfloat16 autocast (no dtype clash
    between bfloat16 activations and float32 state such as memory banks) and computes the loss
    the float32 step computes, to bfloat16's precision."""
    mcfg = MCFG if arch == "sda" else ModelConfig(**{**MCFG.model_dump(), "arch": arch})
    task = make_task(task_name, mcfg, CLASSES)
    upstream = Upstream(np.array([0, 1, 0, 1]), np.array([0, 1, 0, 1]), np.ones(4, dtype=bool))
    fields = upstream.batch_fields
    losses = []
    for amp in (False, True):
        torch.manual_seed(0)
        method = METHODS[name](task.build_network(20), METHOD_CONFIGS[name](), task, upstream)
        src = {**_batch(task, 0), **fields("source", np.arange(B))}
        tgt = {**_batch(task, 1), **fields("target", np.arange(B))}
        if arch == "dmmi":
            src["erase"] = torch.zeros_like(src["tokens"], dtype=torch.bool)
            src["erase"][:, 1] = True
        tgt.pop("label", None)
        method.train()
        dtypes = set()
        conv = next(m for m in method.modules() if isinstance(m, torch.nn.Conv2d))
        conv.register_forward_hook(lambda _m, _i, out, seen=dtypes: seen.add(out.dtype))
        with autocast(torch.device("cpu"), amp):
            loss, logs = method.step(src, tgt, torch.Generator().manual_seed(0))
        assert dtypes == {torch.bfloat16 if amp else torch.float32}
        loss.backward()
        method.after_step()
        assert torch.isfinite(loss) and all(np.isfinite(v) for v in logs.values())
        assert loss.dtype == torch.float32
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=0.05), f"{name}/{task_name}: {losses}"


_AUTO_ON_AVX2 = """
import torch
from components.training import autocast, precision, use_amp
cpu = torch.device("cpu")
with autocast(cpu, "auto"):
    auto = torch.nn.functional.conv2d(torch.ones(1, 1, 4, 4), torch.ones(1, 1, 3, 3)).dtype
print(use_amp(cpu, "auto"), use_amp(cpu, True), precision(cpu, "auto"), auto)
"""


def test_amp_auto_picks_bfloat16_only_where_the_device_computes_it_natively(monkeypatch):
    """``amp: auto`` (each training phase's opt-in) trains in bfloat16 on a device with
    native bfloat16 and in float32 where it would be emulated (a CPU without AVX512-BF16 /
    AMX, a GPU older than Ampere); ``true`` and ``false`` are what they say."""
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert TrainConfig().amp is False  # float32 unless asked
    for native in (True, False):
        monkeypatch.setattr(training, "cpu_bf16_native", lambda native=native: native)
        assert use_amp(cpu, "auto") is native
        assert precision(cpu, "auto") == ("bfloat16" if native else "float32")
        assert use_amp(cpu, True) and not use_amp(cpu, False)
        with autocast(cpu, "auto"):
            conv = torch.nn.functional.conv2d(torch.ones(1, 1, 4, 4), torch.ones(1, 1, 3, 3))
        assert conv.dtype == (torch.bfloat16 if native else torch.float32)
    # a GPU that only emulates bfloat16 (pre-Ampere) is not native
    asked = []
    monkeypatch.setattr(
        torch.cuda,
        "is_bf16_supported",
        lambda including_emulation=True: asked.append(including_emulation) or including_emulation,
    )
    assert not use_amp(gpu, "auto") and asked == [False]


@pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64"), reason="oneDNN's x86 ISA cap"
)
def test_amp_auto_is_float32_on_a_cpu_capped_below_native_bfloat16():
    """The same on a real CPU: with oneDNN capped at AVX2 (as on an AVX2-only machine),
    ``auto`` computes in float32 while ``true`` would still ask for bfloat16."""
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    proc = subprocess.run(
        [sys.executable, "-c", _AUTO_ON_AVX2], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["False", "True", "float32", "torch.float32"]


# --------------------------------------------------------------------------- FDA
def test_fda_keeps_source_phase_and_takes_target_low_amplitude():
    g = torch.Generator().manual_seed(0)
    src, tgt = torch.randn(2, 3, 32, 32, generator=g), torch.randn(2, 3, 32, 32, generator=g) * 3
    out = fda(src, tgt, band=0.1)  # b = 3: a 7 x 7 centred square
    fo, fs, ft = (torch.fft.fftshift(torch.fft.fft2(x), dim=(-2, -1)) for x in (out, src, tgt))
    low = (slice(None), slice(None), slice(13, 20), slice(13, 20))
    assert torch.allclose(fo.abs()[low], ft.abs()[low], atol=1e-3)
    outside = torch.ones(32, 32, dtype=torch.bool)
    outside[13:20, 13:20] = False
    assert torch.allclose(fo.abs()[..., outside], fs.abs()[..., outside], atol=1e-3)
    strong = fs.abs() > 1e-3
    assert torch.allclose(fo.angle()[strong], fs.angle()[strong], atol=1e-3)


# --------------------------------------------------------------------------- ClassMix
def test_classmix_pastes_exactly_the_chosen_classes():
    task = make_task("semantic", MCFG, CLASSES)
    src, tgt = _batch(task, 0), _batch(task, 1)
    pseudo = torch.full((B, H, H), 3, dtype=torch.long)
    mixed, labels, weights, region = class_mix(
        task, src, tgt, pseudo, torch.full((B,), 0.5), torch.Generator().manual_seed(3)
    )
    for i in range(B):
        present = set(src["label"][i].unique().tolist()) - {IGNORE_INDEX}
        chosen = set(src["label"][i][region[i]].unique().tolist())
        assert len(chosen) == (len(present) + 1) // 2 and chosen <= present
        # every pixel of a chosen class is pasted, no other pixel is
        assert torch.equal(region[i], torch.isin(src["label"][i], torch.tensor(sorted(chosen))))
    r = region.unsqueeze(1)
    assert torch.equal(mixed["image"], torch.where(r, src["image"], tgt["image"]))
    assert torch.equal(labels, torch.where(region, src["label"], pseudo))
    assert torch.equal(weights[region], torch.ones(int(region.sum())))
    assert (weights[~region] == 0.5).all()
    # referring: the pasted source object is ignored under the target's query
    ref = make_task("referring", MCFG)
    _, labels, _, region = class_mix(
        ref, _batch(ref, 0), _batch(ref, 1), pseudo.clamp(max=1), torch.ones(B), None
    )
    assert (labels[region] == IGNORE_INDEX).all() and (labels[~region] == 1).all()


# --------------------------------------------------------------------------- DIDA
def test_boundary_mask_by_hand_including_a_row_end():
    labels = torch.tensor(
        [
            [0, 0, 0, 1],
            [0, 0, 0, 0],
            [0, 0, 0, 0],
            [0, 0, 2, 2],
        ]
    ).unsqueeze(0)
    want = torch.tensor(
        [
            [0, 0, 1, 1],
            [0, 0, 1, 1],  # (1, 0): a neighbourhood that wrapped would reach the 1 at (0, 3)
            [0, 1, 1, 1],
            [0, 1, 1, 1],
        ],
        dtype=torch.bool,
    ).unsqueeze(0)
    assert torch.equal(boundary_mask(labels), want)


def test_boundary_mask_counts_classes_above_sigma():
    labels = torch.tensor([[[0, 0, 1], [0, 2, 1], [255, 255, 1]]])
    # (1, 1) sees 0, 1, 2: three classes; (2, 0) sees 0, 2 and ignore: two classes
    assert boundary_mask(labels, sigma=2).tolist() == [
        [[False, True, True], [False, True, True], [False, False, False]]
    ]
    assert not boundary_mask(labels, sigma=1)[0, 2, 0]  # the ignore index is never a boundary


def test_instance_bank_capacity_fill_and_ema_update():
    bank = InstanceBank(3, 4, 2, momentum=0.5, gen=torch.Generator().manual_seed(0))
    assert bank.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4  # class-balanced capacity
    old = bank.features.clone()
    feats = torch.zeros(1, 2, 2, 2)
    feats[0, 0] = 1.0  # every pixel's feature is (1, 0)
    labels = torch.tensor([[[1, 1], [1, 1]]])  # one class, no boundary
    gen = torch.Generator().manual_seed(0)
    assert bank.update(feats, labels, gen) == 4  # first sight: filled with its instances
    assert torch.allclose(bank.features[4:8], torch.tensor([1.0, 0.0]).expand(4, 2))
    feats[0, 0], feats[0, 1] = 0.0, 1.0  # now every pixel is (0, 1)
    bank.update(feats, labels, gen)  # Eq. 11: halfway toward the class centre, renormalised
    want = torch.nn.functional.normalize(torch.tensor([0.5, 0.5]), dim=0).expand(4, 2)
    assert torch.allclose(bank.features[4:8], want)
    assert torch.equal(bank.features[:4], old[:4]) and torch.equal(bank.features[8:], old[8:])


def test_scattering_and_gathering_sharpen_agreement_and_flatten_disagreement():
    bank_labels = torch.tensor([0, 0, 1, 1])
    z = torch.tensor([[0.8, 0.2]])
    agree_q = torch.tensor([[0.45, 0.45, 0.05, 0.05]])
    disagree_q = torch.tensor([[0.05, 0.05, 0.45, 0.45]])
    z_hat, q_hat = regenerate(z, agree_q, bank_labels, phi=0.9)
    assert z_hat[0, 0] > z[0, 0] and q_hat[0, :2].sum() > agree_q[0, :2].sum()
    z_hat, q_hat = regenerate(z, disagree_q, bank_labels, phi=0.9)
    assert z_hat[0, 0] < z[0, 0]  # the semantic label flattens toward the instance one
    assert abs(q_hat[0, :2].sum() - 0.5) < abs(disagree_q[0, :2].sum() - 0.5)
    assert torch.allclose(q_hat.sum(1), torch.ones(1)) and torch.allclose(
        z_hat.sum(1), torch.ones(1)
    )


# --------------------------------------------------------------------------- DANN / MMD
def test_gradient_reversal_sign():
    x = torch.ones(3, requires_grad=True)
    (grad_reverse(x, 0.5) * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert x.grad.tolist() == [-0.5, -1.0, -1.5]


def test_mmd_is_zero_for_identical_batches_and_positive_for_shifted_ones():
    x = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    assert mmd2(x, x.clone(), [1.0, 2.0]).abs() < 1e-6
    assert mmd2(x, x + 3.0, [1.0, 2.0]) > 0.1


# --------------------------------------------------------------------------- metrics
def test_per_class_iou_with_the_ignore_index_by_hand():
    gt = np.array([[0, 0, 1, 255], [1, 1, 2, 255]])
    pred = np.array([[0, 1, 1, 2], [1, 2, 2, 0]])
    m = semantic_metrics([pred], [gt], num_classes=3)
    # class 0: tp 1, fn 1 -> 1/2; class 1: tp 2, fp 1, fn 1 -> 2/4; class 2: tp 1, fp 1 -> 1/2
    assert m["iou/0"] == pytest.approx(0.5)
    assert m["iou/1"] == pytest.approx(0.5)
    assert m["iou/2"] == pytest.approx(0.5)
    assert m["miou"] == pytest.approx(0.5)
