"""Label-free model-selection criteria (components.selection) on hand-built cases, and on a
real network and split."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from components.selection import (
    deep_embedded_validation,
    information_maximization,
    selection_metrics,
    soft_neighborhood_density,
)


def test_information_maximization_rewards_confident_diverse_predictions():
    uniform = torch.full((100, 4), 0.25)
    collapsed = torch.tensor([[1.0, 0, 0, 0]]).repeat(100, 1)
    diverse = torch.eye(4).repeat(25, 1)  # confident, every class equally often
    assert information_maximization(uniform) == pytest.approx(0.0, abs=1e-9)
    assert information_maximization(collapsed) == pytest.approx(0.0, abs=1e-6)
    assert information_maximization(diverse) == pytest.approx(1.0, abs=1e-6)
    half = torch.tensor([[0.9, 0.1], [0.1, 0.9]]).repeat(50, 1)
    h = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))
    assert information_maximization(half) == pytest.approx((math.log(2) - h) / math.log(2))


def test_snd_of_two_tight_clusters_by_hand():
    # 6 identical vectors in one cluster, 4 in another, orthogonal: each point's soft
    # neighbourhood is (almost) uniform over its own cluster's other members
    a = torch.tensor([[1.0, 0.0]]).repeat(6, 1)
    b = torch.tensor([[0.0, 1.0]]).repeat(4, 1)
    got = soft_neighborhood_density(torch.cat([a, b]))
    want = (6 * math.log(5) + 4 * math.log(3)) / 10 / math.log(9)
    assert got == pytest.approx(want, rel=1e-6)
    # one cluster only: every neighbourhood uniform over all others
    assert soft_neighborhood_density(a) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least 3"):
        soft_neighborhood_density(a[:2])


def test_dev_weights_the_source_samples_that_look_like_the_target():
    rng = np.random.default_rng(0)
    src = rng.normal(0.0, 1.0, (400, 2))
    losses = (src[:, 0] > 0).astype(float)  # the model fails on the right half
    same = rng.normal(0.0, 1.0, (400, 2))
    shifted = rng.normal([1.5, 0.0], 1.0, (400, 2))  # the target sits on the right half
    assert deep_embedded_validation(src, losses, same) == pytest.approx(losses.mean(), abs=0.08)
    assert deep_embedded_validation(src, losses, shifted) > losses.mean() + 0.2


def test_every_criterion_on_a_real_network_and_split(tmp_path, tiny_raw):
    from components.config import parse_params
    from components.data.dataset import load_split
    from components.data.schema import write_shard
    from components.data.vocab import Vocab
    from components.tasks import make_task
    from pipelines.prepare import make_rows

    params = parse_params(tiny_raw)
    for domain, split in (("source", "val"), ("target", "val")):
        folder = tmp_path / domain / split
        folder.mkdir(parents=True)
        write_shard(make_rows(params.data, 0, domain, split, 0, 12), folder / "part-0.parquet")
    queries = []
    for domain in ("source", "target"):
        queries += make_rows(params.data, 0, domain, "val", 0, 12).column("query").to_pylist()
    Vocab.build(queries).save(tmp_path / "vocab.json")
    vocab = Vocab.load(tmp_path / "vocab.json")
    m = params.model
    src_val, tgt = (
        load_split(tmp_path, d, "val", vocab, m.max_words, m.num_superpixels)
        for d in ("source", "target")
    )
    task = make_task("referring", m)
    torch.manual_seed(0)
    net = task.build_network(len(vocab))
    out = selection_metrics(task, net, tgt, src_val, torch.device("cpu"), seed=1)
    assert set(out) == {
        "unsup_im",
        "unsup_snd",
        "unsup_dev",
        "src_val_oiou",
        "src_val_miou",
        "src_val_map",
    }
    assert all(np.isfinite(v) for v in out.values())
    assert 0 <= out["unsup_im"] <= 1 and 0 <= out["unsup_snd"] <= 1
    again = selection_metrics(task, net, tgt, src_val, torch.device("cpu"), seed=1)
    assert again == out  # seeded: the same pixels, folds and values
    alone = selection_metrics(task, net, tgt, None, torch.device("cpu"), seed=1)
    assert set(alone) == {"unsup_im", "unsup_snd"}  # no source val: no DEV, no source metric
