"""DMMI, the second referring base network (``model.arch: dmmi``): MBA's sums, the erasure,
delta, one training step through the task, save / load, the zero-target sampler, and that
``arch: sda`` is today's network."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from components.config import ModelConfig
from components.data.dataset import SplitArrays
from components.data.synthetic import ENTITY_NOUNS
from components.data.vocab import Vocab, erasure_mask, tokenize
from components.models.dmmi import DMMINet, auxiliary_loss
from components.models.mba import MBA, span_sum, window_sum
from components.models.network import QuerySegNet, build_model, load_trained, save_trained
from components.tasks import make_task
from components.training import epoch_batches, zero_interleaved_order

BASE = dict(widths=[8, 16, 16, 24], hidden=16, embed_dim=12, num_superpixels=10)
DMMI = ModelConfig(**BASE, arch="dmmi", dmmi={"ccr_heads": 4})
QUERIES = [
    "the red circle left of the blue square",
    "all crosses",
    "the green shape",  # no entity noun: nothing erased
    "find the big wedge",
]
SIZE = 32


def _data(queries=QUERIES, empty=(1,), max_words=8) -> tuple[SplitArrays, Vocab]:
    vocab = Vocab(w for q in queries for w in tokenize(q))
    n = len(queries)
    rng = np.random.default_rng(0)
    masks = np.zeros((n, SIZE, SIZE), dtype=bool)
    for i in range(n):
        if i not in empty:
            masks[i, 4 + 3 * (i % 4) : 14 + 3 * (i % 4), 6:16] = True
    encoded = [vocab.encode(q, max_words) for q in queries]
    data = SplitArrays(
        sample_ids=[str(i) for i in range(n)],
        query_types=["zero" if i in empty else "one" for i in range(n)],
        queries=list(queries),
        images=rng.integers(0, 255, (n, SIZE, SIZE, 3), dtype=np.uint8),
        masks=masks,
        superpixels=rng.integers(0, 7, (n, SIZE, SIZE)).astype(np.int16),
        tokens=np.stack([t for t, _ in encoded]),
        lengths=np.asarray([k for _, k in encoded], dtype=np.int64),
        true_categories=np.zeros(n, dtype=np.int64),
    )
    return data, vocab


def _train_batch(task, data, seed=0):
    from components.data.dataset import to_batch

    rows = np.arange(len(data))
    batch = to_batch(data, rows, torch.device("cpu"))
    return task.training_inputs(batch, data, rows, np.random.default_rng(seed))


# ------------------------------------------------------------------------- MBA, Eqs. 2-6
def test_window_sum_matches_a_naive_loop():
    x = torch.randn(2, 3, 5, 6)
    for k in (1, 3, 5):
        got = window_sum(x, k)
        want = torch.zeros_like(x)
        for i in range(5):
            for j in range(6):
                for di in range(-(k // 2), k // 2 + 1):
                    for dj in range(-(k // 2), k // 2 + 1):
                        if 0 <= i + di < 5 and 0 <= j + dj < 6:
                            want[:, :, i, j] += x[:, :, i + di, j + dj]
        assert torch.allclose(got, want, atol=1e-5), k


def test_span_sum_matches_a_naive_loop():
    x = torch.randn(2, 5, 7)
    x[1, 3:] = 0  # padded words of the second query
    for s in (1, 2, 3):
        got = span_sum(x, s)
        want = torch.zeros_like(x)
        for i in range(5):
            for m in range(i, min(i + s, 5)):
                want[:, i] += x[:, m]
        assert torch.allclose(got, want, atol=1e-6), s


def test_scale_weights_sum_to_one_and_attention_is_a_distribution():
    block = MBA(8, 16, [1, 3, 5], [1, 2, 3])
    with torch.no_grad():
        block.lambda_a.copy_(torch.tensor([0.3, -1.0, 2.0]))
    lam_a, lam_b = block.scale_weights()
    assert lam_a.sum().item() == pytest.approx(1.0) and lam_b.sum().item() == pytest.approx(1.0)
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    v, e, alpha = block(torch.randn(2, 8, 4, 4), torch.randn(2, 4, 16), mask)
    assert v.shape == (2, 8, 4, 4) and e.shape == (2, 4, 16) and alpha.shape == (2, 16, 4)
    assert torch.allclose(alpha.sum(-1), torch.ones(()))
    assert alpha[1, :, 1:].abs().max() == 0  # padded words get no attention
    assert e[0, 3].abs().max() == 0  # padded words stay zero


# ------------------------------------------------------------------------- erasure
def test_the_erased_word_is_absent_at_the_tokenizers_position():
    data, vocab = _data()
    erase = erasure_mask(data.queries, 8, ENTITY_NOUNS, np.random.default_rng(3))
    for row, text in enumerate(data.queries):
        words = tokenize(text)[:8]
        positions = np.flatnonzero(erase[row])
        if not positions.size:
            assert not ENTITY_NOUNS & set(words)  # "the green shape"
            continue
        chosen = {words[p] for p in positions}
        assert len(chosen) == 1 and chosen <= ENTITY_NOUNS
        assert [i for i, w in enumerate(words) if w in chosen] == positions.tolist()
        masked = np.where(erase[row], 1, data.tokens[row])
        assert vocab.stoi[chosen.pop()] not in masked  # really absent
    assert erase[2].sum() == 0 and erase[1].tolist()[:2] == [False, True]  # "all crosses"


def test_nothing_is_erased_at_evaluation():
    torch.manual_seed(0)
    data, vocab = _data()
    task = make_task("referring", DMMI)
    net = task.build_network(len(vocab))
    batch = _train_batch(task, data)
    assert batch["erase"].any()
    net.eval()
    with torch.no_grad():
        out = task.forward(net, batch)
        plain = net(batch["image"], batch["tokens"], batch["lengths"], batch["superpixels"])
    assert "sim_terms" not in out and torch.equal(out["response"], plain["response"])
    with pytest.raises(ValueError, match="training-only"):
        net(batch["image"], batch["tokens"], batch["lengths"], None, erase=batch["erase"])
    sda = make_task("referring", ModelConfig(**BASE))
    assert "erase" not in _train_batch(sda, data)  # the default network never erases


# ------------------------------------------------------------------------- delta, Eqs. 8-11
def test_delta_zeroes_both_losses_for_one_to_zero_samples_only():
    cfg = DMMI.dmmi.model_copy(update={"sim_weight": 1.0, "con_weight": 1.0})
    out = {
        "sim_terms": torch.tensor([0.5, 0.7, 0.2]),
        "con_terms": torch.tensor([1.0, 3.0, 2.0]),
        "erased": torch.tensor([[False, True], [True, False], [False, False]]),
    }
    has_target = torch.tensor([True, False, True])
    # sample 1 is one-to-zero (both terms off); sample 2 erased nothing (L_sim off)
    want = (0.5 + 0.0 + 0.0) / 3 + (1.0 + 0.0 + 2.0) / 3
    assert auxiliary_loss(out, has_target, cfg).item() == pytest.approx(want)
    assert auxiliary_loss(out, torch.zeros(3, dtype=torch.bool), cfg).item() == 0.0
    for key in ("sim_terms", "con_terms"):
        changed = {**out, key: out[key] + torch.tensor([0.0, 9.0, 0.0])}
        assert auxiliary_loss(changed, has_target, cfg) == auxiliary_loss(out, has_target, cfg)
        changed = {**out, key: out[key] + torch.tensor([9.0, 0.0, 0.0])}
        assert auxiliary_loss(changed, has_target, cfg) > auxiliary_loss(out, has_target, cfg)


def test_one_training_step_through_the_task_reaches_every_parameter():
    torch.manual_seed(0)
    data, vocab = _data()
    task = make_task("referring", DMMI)
    net = task.build_network(len(vocab))
    net.train()
    batch = _train_batch(task, data)
    out = task.forward(net, batch)
    seg_only = task.supervised_loss({k: out[k] for k in ("logits", "full_logits")}, batch)
    loss = task.supervised_loss(out, batch)
    assert torch.isfinite(loss) and loss > seg_only  # the auxiliary terms are added
    loss.backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.any()]
    assert missing == []
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    opt.step()
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_outputs_have_the_default_networks_keys_and_shapes():
    data, vocab = _data()
    task = make_task("referring", DMMI)
    batch = _train_batch(task, data)
    args = (batch["image"], batch["tokens"], batch["lengths"], batch["superpixels"])
    ours = build_model(DMMI, len(vocab)).eval()(*args)
    theirs = build_model(ModelConfig(**BASE), len(vocab)).eval()(*args)
    assert set(ours) == set(theirs)
    for key, value in theirs.items():
        if isinstance(value, list):
            assert [t.shape for t in ours[key]] == [t.shape for t in value], key
        else:
            assert ours[key].shape == value.shape, key


def test_save_and_load_rebuild_dmmi(tmp_path):
    data, vocab = _data()
    task = make_task("referring", DMMI)
    net = task.build_network(len(vocab))
    save_trained(tmp_path, net, DMMI, len(vocab), {"phase": "pretrain"}, task)
    again, info = load_trained(tmp_path)
    assert isinstance(again, DMMINet) and info["task_obj"].model == DMMI
    batch = _train_batch(task, data)
    net.eval()
    again.eval()
    with torch.no_grad():
        assert torch.equal(
            task.forward(net, batch)["response"], task.forward(again, batch)["response"]
        )


# ------------------------------------------------------------------------- sampler
def test_zero_interleave_spreads_one_to_zero_samples_and_is_seeded():
    rng = np.random.default_rng(0)
    is_zero = rng.random(103) < 0.1
    is_zero[:5] = True  # clustered at the start of the split
    order = zero_interleaved_order(is_zero, np.random.default_rng(7))
    assert sorted(order.tolist()) == list(range(103))
    slots = np.flatnonzero(is_zero[order])
    bound = int(np.ceil(103 / is_zero.sum()))
    assert np.diff(slots).max() <= bound and slots[0] < bound and 103 - slots[-1] <= bound
    assert np.array_equal(order, zero_interleaved_order(is_zero, np.random.default_rng(7)))
    assert not np.array_equal(order, zero_interleaved_order(is_zero, np.random.default_rng(8)))


def test_epoch_batches_with_and_without_the_sampler():
    data, _ = _data(queries=QUERIES * 5, empty=tuple(range(4)))  # zeros all at the start
    indices = np.arange(len(data))
    shuffled = np.concatenate(
        list(epoch_batches(data, indices, 4, np.random.default_rng(1), False))
    )
    assert np.array_equal(shuffled, np.random.default_rng(1).permutation(len(data)))  # today's
    batches = list(epoch_batches(data, indices, 5, np.random.default_rng(1), True))
    assert [(~data.masks[b].any(axis=(1, 2))).sum() for b in batches] == [1, 1, 1, 1]


# ------------------------------------------------------------------------- the default
def test_arch_sda_builds_exactly_todays_network():
    torch.manual_seed(0)
    default = build_model(ModelConfig(**BASE), 20)
    torch.manual_seed(0)
    direct = QuerySegNet(ModelConfig(**BASE), 20)
    assert type(default) is QuerySegNet
    names = [(n, p.shape) for n, p in default.named_parameters()]
    assert names == [(n, p.shape) for n, p in direct.named_parameters()]
    assert all(
        torch.equal(a, b) for a, b in zip(default.parameters(), direct.parameters(), strict=True)
    )
    assert ModelConfig().arch == "sda" and not ModelConfig().zero_interleave


def test_dmmi_params_are_validated_by_field():
    from pydantic import ValidationError

    for bad, where in (
        ({"dmmi": {"windows": [1, 2]}}, "dmmi.windows"),
        ({"dmmi": {"spans": [1, 1]}}, "dmmi.spans"),
        ({"dmmi": {"temperature": 0}}, "dmmi.temperature"),
        ({"arch": "lavt"}, "arch"),
    ):
        with pytest.raises(ValidationError) as err:
            ModelConfig(**BASE, **bad)
        assert ".".join(map(str, err.value.errors()[0]["loc"])) == where
    with pytest.raises(ValidationError, match="ccr_heads"):
        ModelConfig(**BASE, arch="dmmi", dmmi={"ccr_heads": 3})


def test_adaptation_steps_erase_source_words_only():
    """In the adapt phase the labeled source batch carries DMMI's erased words (its auxiliary
    losses join every method's source loss); the unlabeled target batch never does, and the
    default network's batches draw nothing from the step's generator."""
    from components.adaptation.base import Upstream
    from components.adaptation.phase import step_batch

    data, _ = _data()
    rows, cpu = np.arange(len(data)), torch.device("cpu")
    dmmi = make_task("referring", DMMI)
    rng = np.random.default_rng(0)
    src = step_batch(dmmi, Upstream(), data, "source", rows, cpu, rng)
    tgt = step_batch(dmmi, Upstream(), data, "target", rows, cpu, rng)
    assert "erase" not in tgt
    assert src["erase"].sum(1).tolist() == [1, 1, 0, 1]  # "the green shape" has no entity noun
    sda = make_task("referring", ModelConfig(**BASE))
    rng, untouched = np.random.default_rng(0), np.random.default_rng(0)
    assert "erase" not in step_batch(sda, Upstream(), data, "source", rows, cpu, rng)
    assert rng.random() == untouched.random()
