"""CDANet's parts on tiny tensors whose answers follow from the paper's equations, and its
method on tiny batches of both tasks (``components/adaptation/cdanet.py``)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from components.adaptation.base import Upstream
from components.adaptation.baselines import grad_reverse
from components.adaptation.cdanet import (
    CDANet,
    CrossDomainAttention,
    channel_attention,
    channel_context,
    chunked_spatial_context,
    discriminator_loss,
    output_discriminator,
    spatial_attention,
    spatial_context,
)
from components.adaptation.configs import CDANetConfig
from components.config import ParamsError, parse_params
from components.tasks import make_task
from tests.conftest import real_params
from tests.test_methods import CLASSES, MCFG, _batch


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- attention maps
def test_spatial_attention_normalises_over_the_opposite_domain():
    g_st, g_ts = spatial_attention(_randn(2, 3, 5), _randn(2, 3, 7, seed=1))
    assert g_st.shape == g_ts.shape == (2, 5, 7)  # (pairs, source positions, target positions)
    # Eq. 1: each source position's weights over the target positions sum to one
    assert torch.allclose(g_st.sum(2), torch.ones(2, 5))
    # Eq. 3: each target position's weights over the source positions sum to one
    assert torch.allclose(g_ts.sum(1), torch.ones(2, 7))


def test_channel_attention_normalises_over_the_opposite_domain():
    psi_st, psi_ts = channel_attention(_randn(2, 4, 6), _randn(2, 4, 6, seed=1))
    assert psi_st.shape == psi_ts.shape == (2, 4, 4)  # (pairs, source channels, target channels)
    assert torch.allclose(psi_st.sum(2), torch.ones(2, 4))  # Eq. 5: over target channels
    assert torch.allclose(psi_ts.sum(1), torch.ones(2, 4))  # Eq. 7: over source channels


def test_constant_keys_attend_uniformly():
    # Φ = 0 everywhere: every position takes the mean of the other domain's values
    v_s, v_t = _randn(1, 3, 5), _randn(1, 3, 7, seed=1)
    ctx_s, ctx_t = spatial_context(_randn(1, 2, 5), torch.zeros(1, 2, 7), v_s, v_t)
    assert torch.allclose(ctx_s, v_t.mean(2, keepdim=True).expand(1, 3, 5), atol=1e-6)
    assert torch.allclose(ctx_t, v_s.mean(2, keepdim=True).expand(1, 3, 7), atol=1e-6)


# --------------------------------------------------------------------------- identical domains
def test_identical_domains_give_both_the_same_self_attention_residual():
    # the same maps on both sides: Θ = B B^T is symmetric, so Ψ_{t→s}^T = Ψ_{s→t} and Eqs. 6
    # and 8 add the same channel self-attention term B -> softmax(B B^T) B to both domains
    b = _randn(2, 4, 6)
    ctx_s, ctx_t = channel_context(b, b)
    want = (b @ b.transpose(1, 2)).softmax(2) @ b
    assert torch.allclose(ctx_s, want, atol=1e-6) and torch.allclose(ctx_t, want, atol=1e-6)
    # spatial: with Q = K (tied projections of the same map) Φ is symmetric, and Eqs. 2 and 4
    # both add the position self-attention term V softmax(Q^T Q)^T
    q, v = _randn(2, 3, 5), _randn(2, 4, 5, seed=1)
    ctx_s, ctx_t = spatial_context(q, q, v, v)
    want = v @ (q.transpose(1, 2) @ q).softmax(2).transpose(1, 2)
    assert torch.allclose(ctx_s, want, atol=1e-6) and torch.allclose(ctx_t, want, atol=1e-6)


def test_module_residuals_scale_with_their_weights_on_identical_domains():
    cfg = CDANetConfig(lambda_s=2.0, lambda_t=1.0, xi_s=0.5, xi_t=1.0, key_reduction=2)
    torch.manual_seed(0)
    att = CrossDomainAttention(8, cfg)
    with torch.no_grad():
        att.key.load_state_dict(att.query.state_dict())  # Q = K: a symmetric energy map
    x = _randn(2, 8, 3, 3)
    out = att(x, x.clone())
    (a_s, a_t), (b_s, b_t) = out["spatial"], out["channel"]
    # the identity-initialised A, B and V convs leave x as is: A' - x = lambda * context
    assert torch.allclose(a_s - x, 2.0 * (a_t - x), atol=1e-5)
    assert torch.allclose(b_s - x, 0.5 * (b_t - x), atol=1e-5)
    flat = x.flatten(2)
    want_b = ((flat @ flat.transpose(1, 2)).softmax(2) @ flat).view_as(x)
    assert torch.allclose(b_t - x, want_b, atol=1e-5)
    # the fusion starts as the mean of A' and B'
    z_s, z_t = out["fused"]
    assert torch.allclose(z_s, (a_s + b_s) / 2, atol=1e-5)
    assert torch.allclose(z_t, (a_t + b_t) / 2, atol=1e-5)


def test_attention_output_shapes_and_pairing():
    torch.manual_seed(0)
    att = CrossDomainAttention(8, CDANetConfig())
    x_s, x_t = _randn(3, 8, 4, 5), _randn(3, 8, 4, 5, seed=1)
    out = att(x_s, x_t)
    assert set(out) == {"fused", "spatial", "channel"}
    for f_s, f_t in out.values():
        assert f_s.shape == f_t.shape == (3, 8, 4, 5)
        assert torch.isfinite(f_s).all() and torch.isfinite(f_t).all()
    # source i attends to target i only: pair 1 alone gives the same features
    alone = att(x_s[1:2], x_t[1:2])
    for branch, (f_s, f_t) in out.items():
        assert torch.allclose(f_s[1:2], alone[branch][0], atol=1e-5)
        assert torch.allclose(f_t[1:2], alone[branch][1], atol=1e-5)


# --------------------------------------------------------------------------- memory bound
def test_chunked_spatial_context_equals_the_whole_energy_map():
    q, k = _randn(2, 3, 13), _randn(2, 3, 9, seed=1)
    v_s, v_t = _randn(2, 4, 13, seed=2), _randn(2, 4, 9, seed=3)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v_s, v_t)]
    dense = spatial_context(*leaves)
    grads_dense = torch.autograd.grad(sum((c * c).sum() for c in dense), leaves)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v_s, v_t)]
    chunked = chunked_spatial_context(*leaves, chunk=5)  # 13 positions: chunks 5, 5, 3
    grads_chunked = torch.autograd.grad(sum((c * c).sum() for c in chunked), leaves)
    for a, b in zip((*dense, *grads_dense), (*chunked, *grads_chunked), strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    with torch.no_grad():  # without autograd the chunks are computed plainly
        again = chunked_spatial_context(q, k, v_s, v_t, chunk=4)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(dense, again, strict=True))


# --------------------------------------------------------------------------- adversarial
def test_discriminator_loss_is_low_when_the_discriminator_is_right():
    ones = torch.ones(2, 1, 2, 2)
    right = discriminator_loss(5 * ones, -5 * ones)  # source called source, target target
    chance = discriminator_loss(0 * ones, 0 * ones)
    wrong = discriminator_loss(-5 * ones, 5 * ones)
    assert right < chance < wrong
    assert chance.item() == pytest.approx(2 * math.log(2))


def test_adversarial_gradients_train_the_discriminator_and_fool_it():
    torch.manual_seed(0)
    disc = output_discriminator(2, 4)
    p_s = _randn(2, 2, 32, 32).softmax(1)
    x_t = _randn(2, 2, 32, 32, seed=1).softmax(1).requires_grad_(True)  # target outputs
    loss = discriminator_loss(disc(grad_reverse(p_s, 1.0)), disc(grad_reverse(x_t, 1.0)))
    loss.backward()
    # the discriminator descends its loss: a small step along its gradient lowers it
    with torch.no_grad():
        for p in disc.parameters():
            p -= 1e-2 * p.grad
        after = discriminator_loss(disc(p_s), disc(x_t))
    assert after < loss
    # the network gets the reversed gradient: descending it raises the "source" logit of the
    # target outputs (first order: the step's directional derivative is positive)
    (d_source,) = torch.autograd.grad(disc(x_t).mean(), x_t)
    assert (d_source * -x_t.grad).sum() > 0


# --------------------------------------------------------------------------- the method
def _method(task_name: str, **cfg) -> tuple[CDANet, torch.nn.Module, object]:
    torch.manual_seed(0)
    task = make_task(task_name, MCFG, CLASSES)
    network = task.build_network(20)
    return CDANet(network, CDANetConfig(**cfg), task, Upstream()), network, task


def _target(task, seed: int, rows: int | None = None) -> dict:
    tgt = _batch(task, seed)
    tgt.pop("label", None)  # target ground truth never reaches a method
    tgt["mask"] = torch.zeros_like(tgt["mask"])
    return {k: v[:rows] for k, v in tgt.items()} if rows else tgt


@pytest.mark.parametrize("task_name", ["referring", "semantic"])
def test_one_step_gives_a_finite_loss_and_gradients_everywhere(task_name):
    # threshold 0: every target pixel is pseudo-labelled, so Eq. 11's target terms count;
    # a target batch one row short: the pairs are the first three rows
    method, _, task = _method(task_name, threshold=0.0, chunk=5)  # 4 x 4 positions: chunked
    method.train()
    loss, logs = method.step(_batch(task, 0), _target(task, 1, rows=3), torch.Generator())
    assert torch.isfinite(loss) and all(np.isfinite(v) for v in logs.values())
    assert logs["pseudo_share"] == 1.0 and logs["l_seg_tgt"] > 0
    loss.backward()
    missing = [n for n, p in method.named_parameters() if p.grad is None]
    assert not missing, missing[:5]
    assert {id(p) for p in method.trainable()} == {id(p) for p in method.parameters()}


@pytest.mark.parametrize("task_name", ["referring", "semantic"])
def test_inference_network_predicts_an_image_as_it_would_alone(task_name):
    method, network, task = _method(task_name)
    method.train()
    loss, _ = method.step(_batch(task, 0), _target(task, 1), torch.Generator())
    loss.backward()
    torch.optim.SGD(method.trainable(), lr=0.1).step()
    net = method.inference_network()
    assert net is network  # evaluate rebuilds exactly this network from model.pt
    net.eval()
    batch = _target(task, 2)
    with torch.no_grad():
        together = task.class_logits(task.forward(net, batch))
        for i in range(len(together)):
            alone = task.class_logits(
                task.forward(net, {k: v[i : i + 1] for k, v in batch.items()})
            )
            assert torch.allclose(alone[0], together[i], atol=1e-5)


# --------------------------------------------------------------------------- params
def _cdanet_params(section: dict) -> dict:
    raw = real_params()
    raw["adapt"].pop("sda")
    raw["adapt"].update(method="cdanet", cdanet=section)
    raw["tune"]["space"].pop("adapt")  # its entries are SDA's
    return raw


def test_params_select_cdanet_and_bad_fields_are_named():
    params = parse_params(_cdanet_params({}), "params.yaml")
    assert params.adapt.method_config == CDANetConfig()
    assert params.compare.sections["cdanet"]  # the comparison's section validates too
    with pytest.raises(ParamsError, match=r"adapt\.cdanet\.threshold"):
        parse_params(_cdanet_params({"threshold": 1.5}), "params.yaml")
    with pytest.raises(ParamsError, match=r"adapt\.cdanet\.chunk"):
        parse_params(_cdanet_params({"chunk": 0}), "params.yaml")
