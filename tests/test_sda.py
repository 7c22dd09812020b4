"""SDA's equations on hand-built inputs whose answers are known."""

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from components.adaptation.base import Upstream
from components.adaptation.configs import SDAConfig
from components.adaptation.sda import csm
from components.adaptation.sda.cam import (
    MultiLabelClassifier,
    category_cam,
    label_prior_loss,
    multi_hot,
    multilabel_loss,
    superpixel_refine,
)
from components.adaptation.sda.cfb import MemoryBank, ema_update, info_nce, pseudo_masks
from components.adaptation.sda.clustering import agglomerative, cluster_contents, prototypes
from components.adaptation.sda.method import SDA
from components.adaptation.sda.rrb import MIDiscriminator, mutual_information
from components.adaptation.sda.semantics import Extracted, build
from components.config import ModelConfig, SemanticsConfig
from components.models.network import build_model
from components.tasks import make_task


# --------------------------------------------------------------------------- Eq. 1
def test_visual_guided_weights_and_content_by_hand():
    # 2 pixels x 3 words (last one padding); only pixel 0 is foreground
    alpha = torch.tensor([[[0.8, 0.2, 0.0], [0.1, 0.9, 0.0]]])
    fg = torch.tensor([[1.0, 0.0]])
    mask = torch.tensor([[True, True, False]])
    bar = csm.visual_guided_weights(alpha, fg, mask)
    assert bar[0].tolist() == pytest.approx([0.8, 0.2, 0.0])
    words = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])
    h = csm.content_features(bar, words, mask, tau=0.2)
    # softmax([4, 1]) = [e^3 / (e^3 + 1), 1 / (e^3 + 1)], then 1/N with N = 2 real words
    w0 = math.exp(3) / (math.exp(3) + 1)
    assert h[0].tolist() == pytest.approx([w0 / 2, (1 - w0) / 2], abs=1e-6)
    # no foreground at all: uniform over the real words
    uniform = csm.visual_guided_weights(alpha, torch.zeros(1, 2), mask)
    assert uniform[0].tolist() == pytest.approx([0.5, 0.5, 0.0])


def test_temperature_sharpens():
    bar = torch.tensor([[0.6, 0.4]])
    words = torch.eye(2).unsqueeze(0)
    mask = torch.ones(1, 2, dtype=torch.bool)
    soft = csm.content_features(bar, words, mask, tau=1.0)
    sharp = csm.content_features(bar, words, mask, tau=0.05)
    assert sharp[0, 0] > soft[0, 0] and sharp[0, 0] == pytest.approx(0.5, abs=0.01)


def test_predictor_learns_word_importance():
    torch.manual_seed(0)
    words = torch.randn(64, 4, 8)
    mask = torch.ones(64, 4, dtype=torch.bool)
    target = torch.softmax(words[..., 0] * 3, -1)  # importance = first embedding dimension
    pred = csm.WordImportancePredictor(8)
    opt = torch.optim.Adam(pred.parameters(), lr=1e-2)
    first = csm.predictor_loss(pred(words, mask), target).item()
    for _ in range(200):
        loss = csm.predictor_loss(pred(words, mask), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * first


# --------------------------------------------------------------------------- Eq. 2
def test_target_assignment_with_known_entropy():
    protos = np.array([[1.0, 0.0], [0.0, 1.0]])
    h = np.array([[1.0, 0.0], [1.0, 1.0]])  # one sure, one exactly in between
    nearest, ent, reliable = csm.assign_target(h, protos, beta=0.5, temperature=0.05)
    assert nearest[0] == 0
    assert ent[1] == pytest.approx(math.log(2))  # uniform over 2 categories
    assert ent[0] < 1e-6
    assert reliable.tolist() == [True, False]  # boundary = 0.5 * log 2
    assert csm.assign_target(h, protos, 0.5, use_boundary=False)[2].all()
    # a single source category: entropy 0, everything reliable, no NaN
    _, ent1, rel1 = csm.assign_target(h, protos[:1], 0.5)
    assert np.isfinite(ent1).all() and rel1.all()


# --------------------------------------------------------------------------- Eq. 3
def test_semantic_init_loss_on_separable_prototypes():
    bank = csm.PrototypeBank(2, 2, momentum=1.0)  # prototypes frozen once seen
    feats = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    good = csm.semantic_init_loss(feats, torch.tensor([0, 0, 1, 1]), bank, temperature=0.1)
    assert good.item() < 0.01
    swapped = csm.semantic_init_loss(feats, torch.tensor([1, 1, 0, 0]), bank, temperature=0.1)
    assert swapped.item() > 5.0  # every pixel is closest to the other category's prototype


def test_semantic_init_loss_single_category_is_zero_not_nan():
    bank = csm.PrototypeBank(3, 2)
    feats = torch.randn(5, 2, requires_grad=True)
    loss = csm.semantic_init_loss(feats, torch.zeros(5, dtype=torch.long), bank)
    assert loss.item() == 0.0 and loss.requires_grad


# --------------------------------------------------------------------------- clustering
def test_scalable_clustering_matches_plain_agglomerative_on_small_data():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 16))
    x = np.concatenate([c + 0.05 * rng.normal(size=(20, 16)) for c in centres])
    x = np.concatenate([x, x[:30]])  # exact duplicates, as repeated queries give
    plain = agglomerative(x / np.linalg.norm(x, axis=1, keepdims=True), 0.5)
    ours = cluster_contents(x, 0.5)
    assert adjusted_rand_score(plain, ours) == 1.0
    assert len(set(ours)) == 5


def test_pre_clustering_path_stays_close_to_exact():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(6, 8))
    x = np.concatenate([c + 0.05 * rng.normal(size=(300, 8)) for c in centres])
    exact = cluster_contents(x, 0.15, max_exact=10_000)
    approx = cluster_contents(x, 0.15, max_exact=200)  # forces MiniBatchKMeans pre-clustering
    assert adjusted_rand_score(exact, approx) > 0.95
    assert prototypes(x, approx).shape == (len(set(approx)), 8)


def test_other_clustering_algorithms_and_errors():
    x = np.random.default_rng(2).normal(size=(40, 4))
    assert len(set(cluster_contents(x, 0.5, "kmeans", n_clusters=3))) == 3
    assert len(set(cluster_contents(x, 0.5, "spectral", n_clusters=3))) == 3
    with pytest.raises(ValueError, match="needs n_clusters"):
        cluster_contents(x, 0.5, "kmeans")
    with pytest.raises(ValueError, match="unknown clustering"):
        cluster_contents(x, 0.5, "dbscan")


def _extracted(n, seed):
    g = np.random.default_rng(seed)
    words = g.normal(size=(n, 3, 4)).astype(np.float32)
    return Extracted(
        words=words,
        query=words,
        word_mask=np.ones((n, 3), bool),
        weights_gt=np.full((n, 3), 1 / 3, np.float32),
        weights_pred=np.full((n, 3), 1 / 3, np.float32),
        visual_gt=words[:, 0],
        visual_pred=words[:, 0],
    )


def test_semantic_construction_edge_cases():
    src, tgt = _extracted(30, 0), _extracted(20, 1)
    # a threshold so large that the source is one category: handled, target all common
    one = build(src, tgt, SemanticsConfig(distance_threshold=2.0, predictor=False), 0)
    assert one.k_s == 1 and one.reliable_t.all() and one.k_u == 0
    # CSM off: a single category everywhere
    off = build(src, tgt, SemanticsConfig(enabled=False), 0)
    assert set(off.labels_t) == {0} and off.k_t == 1
    # an impossibly strict boundary: no reliable sample, all become unknown categories
    none = build(src, tgt, SemanticsConfig(beta=1e-9, distance_threshold=0.3), 0)
    assert not none.reliable_t.any() and (none.labels_t >= none.k_s).all() and none.k_t == 0


# --------------------------------------------------------------------------- Eq. 4
def test_info_nce_with_one_perfect_positive():
    anchors = torch.tensor([[1.0, 0.0]])
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    loss, n = info_nce(anchors, torch.tensor([3]), keys, torch.tensor([3, -1]), temperature=1.0)
    assert n == 1
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)))
    sharp, _ = info_nce(anchors, torch.tensor([3]), keys, torch.tensor([3, -1]), 0.01)
    assert sharp.item() < 1e-6


def test_info_nce_without_positive_is_skipped_not_nan():
    anchors = torch.randn(4, 2, requires_grad=True)
    loss, n = info_nce(
        anchors, torch.tensor([0, 0, 1, 1]), torch.randn(3, 2), torch.tensor([5, -1, -1]), 0.1
    )
    assert n == 0 and loss.item() == 0.0 and loss.requires_grad


def test_plain_similarity_ablation():
    anchors = torch.tensor([[1.0, 0.0]])
    keys = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    loss, _ = info_nce(
        anchors, torch.tensor([1]), keys, torch.tensor([1, 2]), 0.1, contrastive=False
    )
    assert loss.item() == pytest.approx(1.0)  # 1 - cos(90 degrees); the negative is ignored


def test_memory_bank_is_a_per_category_fifo():
    bank = MemoryBank(size=2)
    for i in range(3):
        bank.push("source", torch.full((1, 2), float(i)), torch.tensor([7]))
    bank.push("source", torch.ones(1, 2) * 9, torch.tensor([8]))
    bank.push("target", torch.zeros(1, 2), torch.tensor([7]))
    feats, cats = bank.get("source")
    assert cats.tolist() == [7, 7, 8]
    assert feats[:, 0].tolist() == [1.0, 2.0, 9.0]  # the oldest entry of category 7 left
    assert len(bank) == 4
    empty, _ = MemoryBank(3).get("target")
    assert empty.numel() == 0


def test_ema_update():
    student, teacher = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
    student.weight.data.fill_(1.0)
    teacher.weight.data.fill_(0.0)
    ema_update(teacher, student, momentum=0.99)
    assert teacher.weight.item() == pytest.approx(0.01)


def test_pseudo_masks_thresholds():
    # relative to the map's maximum (0.5): [[1.0, 0.5], [0.04, 0.9]]
    resp = torch.tensor([[[0.5, 0.25], [0.02, 0.45]]])
    fg, bg = pseudo_masks(resp, 0.9, 0.1)
    assert fg.tolist() == [[[True, False], [False, False]]]  # 0.9 is not above gamma_max
    assert bg.tolist() == [[[False, False], [True, False]]]


# --------------------------------------------------------------------------- Eq. 6
def test_mutual_information_sign():
    phi = MIDiscriminator(2, 2)
    with torch.no_grad():
        phi.bilinear.weight.copy_(torch.eye(2).unsqueeze(0) * 5)
        phi.bilinear.bias.zero_()
    a = torch.tensor([[1.0, 0.0]])
    match, other = torch.tensor([[1.0, 0.0]]), torch.tensor([[-1.0, 0.0]])
    valid = torch.tensor([True])
    # the JSD estimate is at most 0 and reaches it when the discriminator separates the pairs
    right = mutual_information(phi, a, match, other, valid).item()
    wrong = mutual_information(phi, a, other, match, valid).item()
    assert -0.02 < right <= 0 and wrong < -9  # so the loss -MI rewards telling them apart
    zero = mutual_information(phi, a, match, other, torch.tensor([False]))
    assert zero.item() == 0.0


# --------------------------------------------------------------------------- B.2
def test_superpixel_refinement_by_hand():
    cam = torch.tensor([[[1.0, 0.0], [0.2, 0.2]]])
    sp = torch.tensor([[[0, 0], [1, 1]]])
    # region 0 mean 0.5 > 0.3 -> on; region 1 mean 0.2 -> off
    assert superpixel_refine(cam, sp, 0.3).tolist() == [[[True, True], [False, False]]]


def test_cam_normalisation_and_image_labels_by_hand():
    cams = torch.tensor([[[[2.0, -1.0], [1.0, 0.0]], [[-1.0, -2.0], [-3.0, -1.0]]]])
    cam = category_cam(cams.expand(2, -1, -1, -1), torch.tensor([0, 1]), (2, 2))
    assert cam[0].tolist() == [[1.0, 0.0], [0.5, 0.0]]  # ReLU, then / max
    assert cam[1].abs().sum() == 0  # nothing positive: no CAM, not a stretched one
    # queries 0, 1 show image 0 (categories 2 and 0); query 2 shows image 1 but finds nothing
    labels = multi_hot(np.array([0, 0, 1]), np.array([2, 0, 1]), np.array([1, 1, 0], bool), 2, 3)
    assert labels.tolist() == [[1, 0, 1], [0, 0, 0]]
    assert label_prior_loss(np.array([[1.0], [0.0]])) == pytest.approx(math.log(2))


@pytest.mark.parametrize("pooling", ["lse", "gap", "max"])
def test_classifier_starts_from_the_label_prior(pooling):
    """Many rare categories (benchmark v4: ~55, 1-3 per image): an untrained classifier given
    the label frequencies scores near the label prior's loss; without them, every score starts
    near one half, several times the prior's loss."""
    rng = np.random.default_rng(0)
    prior = rng.uniform(0.01, 0.1, 50)
    labels = (rng.random((64, 50)) < prior).astype(np.float32)
    images = torch.from_numpy(rng.random((64, 3, 32, 32), dtype=np.float32))
    target = label_prior_loss(labels)

    def initial_loss(start):
        torch.manual_seed(0)
        clf = MultiLabelClassifier(50, [8, 8, 16, 16], pooling=pooling, prior=start)
        with torch.no_grad():
            return multilabel_loss(clf(images)[0], torch.from_numpy(labels)).item()

    assert initial_loss(prior) == pytest.approx(target, rel=0.25)
    assert initial_loss(None) > 3 * target


def _classifier_case(tmp_path):
    """Target images with one object each; an image's category is its object's colour (easy
    to see, so the classifier must learn it in a few epochs) and is named by both its queries."""
    from components.config import parse_params
    from components.data.dataset import load_split
    from components.data.schema import write_shard
    from components.data.synthetic import COLORS
    from components.data.vocab import Vocab
    from pipelines.prepare import make_rows
    from tests.conftest import tiny_params

    raw = tiny_params()
    raw["data"].update(
        gap={"content_shift": 0, "visual_gap": 0, "language_gap": 0, "relation_bias": 0},
        min_objects=1,
        max_objects=1,
        query_mix={"one": 1.0, "many": 0.0, "zero": 0.0},
        queries_per_image=2,
    )
    raw["masks"].update(epochs=12, batch_size=16, lr=3e-3, warmup_steps=5)
    params = parse_params(raw, "test")
    table = make_rows(params.data, 0, "target", "train", 0, 480)
    (tmp_path / "target/train").mkdir(parents=True)
    write_shard(table, tmp_path / "target/train/part-0.parquet")
    vocab = Vocab.build(table.column("query").to_pylist())
    data = load_split(tmp_path, "target", "train", vocab, 12, params.model.num_superpixels)
    palette = np.array(list(COLORS.values()), float)
    mean = np.stack([img[m].mean(0) for img, m in zip(data.images, data.masks, strict=True)])
    colour = np.argmin(((mean[:, None] - palette[None]) ** 2).sum(-1), 1)
    return params, data, colour


def test_masks_classifier_learns_image_labels_and_its_cam_finds_the_object(tmp_path, ray_local):
    """B.2 end to end in one process: the classifier beats the loss of the label prior, its
    held-out mAP is reported, and the masks it keeps lie on the object of their category."""
    from pipelines import masks
    from tests.golden_harness import _run

    params, data, colour = _classifier_case(tmp_path)
    none_empty = np.zeros(len(data), bool)
    inputs, classes = masks.classifier_inputs(data, colour, none_empty, None, params.masks)
    assert inputs.labels.shape == (240, 6) and inputs.labels.sum(1).tolist() == [1.0] * 240
    assert len(inputs.val) > 0 and not set(inputs.val) & set(inputs.train)
    rows, state = _run(masks.setup_classifier, inputs, params, "masks")
    assert rows[-1]["loss"] < 0.9 * label_prior_loss(inputs.labels[inputs.train])
    assert rows[-1]["val_map"] > rows[0]["val_map"]
    clf = masks.classifier(6, params.model.widths, params.masks)
    clf.load_state_dict(state["modules"]["classifier"])
    sem, scores = masks.semantic_masks(clf, data, classes, params.masks)
    kept = sem.any((1, 2))
    assert kept.mean() > 0.1  # the score check keeps the confident ones ...
    assert (scores[kept] >= params.masks.score_threshold).all()  # ... and only them
    on_object = (sem & data.masks).sum() / sem.sum()
    assert on_object > 0.8  # objects cover ~5 % of an image


def test_cfb_anchor_cells_keep_a_small_object():
    from components.adaptation.sda.method import anchor_cells

    mask = torch.zeros(2, 8, 8)
    mask[0, :4, :4] = 1  # a whole cell of a 2 x 2 grid
    mask[1, 3:5, 3:5] = 1  # a small object across four cells, a quarter of each
    half = anchor_cells(mask, (2, 2), "majority")
    assert half[0].tolist() == [[True, False], [False, False]] and not half[1].any()
    peak = anchor_cells(mask, (2, 2), "majority_or_peak")
    assert peak[0].equal(half[0]) and peak[1].sum() == 1  # one anchor, not none
    assert not anchor_cells(torch.zeros(1, 8, 8), (2, 2), "majority_or_peak").any()


# --------------------------------------------------------------------------- Eq. 7
def test_sda_step_runs_every_branch_and_handles_empty_pseudo_masks():
    torch.manual_seed(0)
    mcfg = ModelConfig(widths=[8, 16, 16, 24], hidden=16, embed_dim=12, num_superpixels=10)
    upstream = Upstream(np.array([0, 1, 0, 1]), np.array([0, 1, 0, 1]), np.ones(4, dtype=bool))
    method = SDA(build_model(mcfg, 20), SDAConfig(), make_task("referring", mcfg), upstream)

    def batch(seed):
        g = torch.Generator().manual_seed(seed)
        mask = torch.zeros(4, 32, 32)
        mask[:, 8:20, 8:20] = 1
        return {
            "image": torch.randn(4, 3, 32, 32, generator=g),
            "tokens": torch.randint(2, 20, (4, 5), generator=g),
            "lengths": torch.full((4,), 5),
            "superpixels": torch.randint(0, 10, (4, 32, 32), generator=g),
            "mask": mask,
        }

    def labelled(seed):
        return {**batch(seed), **upstream.batch_fields("target", np.arange(4))}

    loss, logs = method.step(labelled(0), labelled(1))
    assert torch.isfinite(loss)
    assert {"l_ct", "l_aux", "l_ho", "l_cfb"} <= set(logs)
    assert logs["empty_pseudo"] == 0.0 and logs["anchors_st"] > 0
    # no target pixel can pass gamma_max = 1: the contrast is skipped, nothing breaks
    method.cfg = SDAConfig(gamma_max=1.0)
    empty, logs = method.step(labelled(0), labelled(1))
    assert torch.isfinite(empty) and logs["empty_pseudo"] == 1.0
    # target samples whose semantic mask was dropped: trained towards background, or left out
    dropped = labelled(1)
    dropped["mask"] = dropped["mask"].clone()
    dropped["mask"][:3] = 0
    method.cfg = SDAConfig(dropped_masks="ignore")
    _, logs = method.step(labelled(0), dropped)
    assert logs["aux_samples"] == 1.0 and logs["l_aux"] > 0
    dropped["mask"][3] = 0
    _, logs = method.step(labelled(0), dropped)
    assert logs["aux_samples"] == 0.0 and logs["l_aux"] == 0.0
    method.cfg = SDAConfig()
    loss.backward()
    assert method.aux.heads[0].out.weight.grad is not None
    assert all(p.grad is None for p in method.teacher.parameters())
    before = [p.clone() for p in method.teacher.parameters()]
    method.after_step()
    assert all(
        torch.allclose(b, p) for b, p in zip(before, method.teacher.parameters(), strict=True)
    )
