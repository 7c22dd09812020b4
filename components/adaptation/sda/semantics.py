"""Semantic construction end to end: from a stage-1 model and the two training splits to a
category label for every sample (SDA Section 3.2). The equations live in ``csm.py`` and
``clustering.py``; this module wires them in the order of Fig. 3 and implements the ablations
of Table 4 / Appendix D.1 as switches of :class:`~components.config.SemanticsConfig`.

Samples whose query refers to nothing have no foreground: their visual-guided weights are
uniform (Eq. 1 degenerates to the mean word embedding), and they are still clustered.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import normalized_mutual_info_score

from components.adaptation.sda import csm
from components.adaptation.sda.clustering import cluster_contents, prototypes
from components.adaptation.sda.grounding import (
    Grounding,
    apply_grounding,
    ground_words,
    word_table,
)
from components.config import SemanticsConfig
from components.data.dataset import SplitArrays, iterate_batches, network_inputs, to_batch
from components.data.vocab import Vocab
from components.models.network import predict_masks

log = logging.getLogger(__name__)


@dataclass
class Extracted:
    """Per-sample inputs of CSM from one forward pass of the stage-1 model. N samples, L words."""

    words: np.ndarray  # (N, L, E) word embeddings W
    query: np.ndarray  # (N, L, C) encoded Q
    word_mask: np.ndarray  # (N, L) bool
    weights_gt: np.ndarray  # (N, L) alpha_bar over the annotated foreground
    weights_pred: np.ndarray  # (N, L) alpha_bar over the predicted foreground
    visual_gt: np.ndarray  # (N, C_v) mean last-layer feature over the annotated foreground
    visual_pred: np.ndarray  # (N, C_v) ... over the predicted foreground
    empty: np.ndarray | None = None  # (N,) bool: the model predicts no foreground


@torch.no_grad()
def extract(model, data: SplitArrays, batch_size: int, device, empty_threshold: float):
    model.eval()
    parts: dict[str, list] = {k: [] for k in Extracted.__dataclass_fields__}
    for idx in iterate_batches(len(data), batch_size, shuffle=False):
        b = to_batch(data, idx, device)
        args, kwargs = network_inputs(b)
        out = model(*args, **kwargs)
        h, w = out["features"].shape[-2:]
        pred, _ = predict_masks(out["response"], empty_threshold)

        def down(mask, h=h, w=w):  # (B, H, W) -> (B, h*w) fraction of foreground per cell
            return F.adaptive_avg_pool2d(mask.float().unsqueeze(1), (h, w)).flatten(1)

        fg_gt, fg_pred = down(b["mask"]), down(pred)
        parts["words"].append(out["words"])
        parts["query"].append(out["query"])
        parts["word_mask"].append(out["word_mask"])
        parts["weights_gt"].append(csm.visual_guided_weights(out["alpha"], fg_gt, out["word_mask"]))
        parts["weights_pred"].append(
            csm.visual_guided_weights(out["alpha"], fg_pred, out["word_mask"])
        )
        parts["visual_gt"].append(csm.mean_pool_visual(out["features"], fg_gt))
        parts["visual_pred"].append(csm.mean_pool_visual(out["features"], fg_pred))
        parts["empty"].append(~pred.flatten(1).any(1))
    return Extracted(**{k: torch.cat(v).cpu().numpy() for k, v in parts.items()})


def train_predictor(src: Extracted, cfg: SemanticsConfig, seed: int, batch_size: int = 64):
    """Appendix B.1: fit the word-importance MLP to the source visual-guided weights."""
    torch.manual_seed(seed)
    words = torch.from_numpy(src.words)
    target = torch.from_numpy(src.weights_gt)
    mask = torch.from_numpy(src.word_mask)
    predictor = csm.WordImportancePredictor(words.shape[-1])
    opt = torch.optim.Adam(predictor.parameters(), lr=1e-3)
    rng = np.random.default_rng(seed)
    losses = []
    for _epoch in range(cfg.predictor_epochs):
        total = 0.0
        for idx in iterate_batches(len(words), batch_size, shuffle=True, rng=rng):
            loss = csm.predictor_loss(
                predictor(words[idx], mask[idx]), target[idx], cfg.predictor_loss
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        losses.append(total / len(words))
    return predictor, losses


def content(ex: Extracted, weights: np.ndarray, visual: np.ndarray, cfg: SemanticsConfig):
    """Content features H (N, E) for the configured extraction."""
    if cfg.extraction == "mean_visual":
        return visual
    feats = torch.from_numpy(ex.words if cfg.content == "embedding" else ex.query)
    mask = torch.from_numpy(ex.word_mask)
    if cfg.extraction == "mean_text":
        return csm.mean_pool_text(feats, mask).numpy()
    return csm.content_features(torch.from_numpy(weights), feats, mask, cfg.tau).numpy()


@dataclass
class SemanticsResult:
    labels_s: np.ndarray  # (N_s,) source category in [0, k_s)
    labels_t: np.ndarray  # (N_t,) target category: common < k_s <= unknown
    entropy_t: np.ndarray  # (N_t,)
    reliable_t: np.ndarray  # (N_t,) bool
    prototypes: np.ndarray  # (k_s, E)
    k_s: int
    k_t: int
    k_u: int
    predictor: torch.nn.Module | None
    predictor_losses: list[float]
    empty_t: np.ndarray | None = None  # (N_t,) bool: the stage-1 model predicts no foreground
    grounding: Grounding | None = None  # semantics.word_grounding: what it found


def build(src: Extracted, tgt: Extracted, cfg: SemanticsConfig, seed: int) -> SemanticsResult:
    """Cluster source contents, assign reliable target samples, cluster the rest (Eq. 2)."""
    n_s, n_t = len(src.words), len(tgt.words)
    if not cfg.enabled:
        return SemanticsResult(
            np.zeros(n_s, np.int64),
            np.zeros(n_t, np.int64),
            np.zeros(n_t),
            np.ones(n_t, bool),
            np.zeros((1, src.words.shape[-1])),
            1,
            1,
            0,
            None,
            [],
        )
    predictor, losses = None, []
    if cfg.predictor and cfg.extraction == "attentive":
        predictor, losses = train_predictor(src, cfg, seed)
        with torch.no_grad():
            weights_t = predictor(torch.from_numpy(tgt.words), torch.from_numpy(tgt.word_mask))
        weights_t = weights_t.numpy()
    else:  # w/o predictor: attention over the stage-1 model's own target predictions
        weights_t = tgt.weights_pred
    h_s = content(src, src.weights_gt, src.visual_gt, cfg)
    h_t = content(tgt, weights_t, tgt.visual_pred, cfg)

    kw = {
        "algorithm": cfg.clustering,
        "n_clusters": cfg.n_clusters,
        "max_exact": cfg.max_exact,
        "seed": seed,
    }
    labels_s = cluster_contents(h_s, cfg.distance_threshold, **kw)
    protos = prototypes(h_s, labels_s)
    k_s = len(protos)
    if k_s == 1:
        log.warning("clustering gave a single source category: CFB and L_si see one class")
    nearest, ent, reliable = csm.assign_target(
        h_t, protos, cfg.beta, cfg.boundary, cfg.similarity_temperature
    )
    labels_t = nearest.copy()
    k_u = 0
    if (~reliable).any():
        extra = cluster_contents(h_t[~reliable], cfg.distance_threshold, **kw)
        labels_t[~reliable] = k_s + extra
        k_u = int(extra.max()) + 1
    if not reliable.any():
        log.warning("no reliable target sample: every target sample is an unknown category")
    k_t = len(np.unique(labels_t[reliable]))
    return SemanticsResult(
        labels_s, labels_t, ent, reliable, protos, k_s, k_t, k_u, predictor, losses
    )


def purity(labels: np.ndarray, truth: np.ndarray) -> float:
    """Share of samples whose cluster's majority true category is their own."""
    total = 0
    for c in np.unique(labels):
        total += np.bincount(truth[labels == c]).max()
    return total / max(1, len(labels))


def diagnostics(res: SemanticsResult, truth_s: np.ndarray, truth_t: np.ndarray) -> dict:
    """Cluster quality against the benchmark's true categories (never used for training)."""
    return {
        "k_s": res.k_s,
        "k_t": res.k_t,
        "k_u": res.k_u,
        "reliable_fraction": float(res.reliable_t.mean()),
        "purity_source": purity(res.labels_s, truth_s),
        "purity_target": purity(res.labels_t, truth_t),
        "nmi_source": float(normalized_mutual_info_score(truth_s, res.labels_s)),
        "nmi_target": float(normalized_mutual_info_score(truth_t, res.labels_t)),
    }


def ground(model, source: SplitArrays, target: SplitArrays, vocab: Vocab, params) -> Grounding:
    """Word grounding as ``params.semantics`` sets it (``grounding_min_score``, its alpha)."""
    cfg = params.semantics
    min_score = cfg.grounding_min_score
    return ground_words(
        model,
        source,
        target,
        vocab,
        params.model.max_words,
        None if min_score == "chance" else min_score,
        cfg.grounding_alpha,
        params.seed,
    )


def compute(model, source: SplitArrays, target: SplitArrays, params, vocab: Vocab | None = None):
    """CSM in this process: word grounding (``semantics.word_grounding``, on a copy of
    ``model``), extraction, predictor, clustering; returns (result, diagnostics).

    ``result.labels_s`` / ``labels_t`` / ``reliable_t`` follow the row order of the splits.
    """
    cfg, thr = params.semantics, params.model.empty_threshold
    diag: dict = {}
    found = None
    if cfg.word_grounding == "visual" and word_table(model) is None:
        log.warning(
            "semantics.word_grounding: the network has no word table W (text_encoder: "
            "contextual reads a pretrained encoder's sub-words): nothing to ground"
        )
    elif cfg.word_grounding == "visual":
        if vocab is None:
            raise ValueError("semantics.word_grounding: visual needs the vocabulary")
        found = ground(model, source, target, vocab, params)
        model = copy.deepcopy(model)
        apply_grounding(model, vocab, found.words())
        diag = {"grounded_words": len(found.mapping), "target_only_words": len(found.unseen)}
        if np.isfinite(found.threshold):  # NaN: no word or no probe to test, chance unknown
            diag["grounding_threshold"] = found.threshold
    src = extract(model, source, 64, torch.device("cpu"), thr)
    tgt = extract(model, target, 64, torch.device("cpu"), thr)
    res = build(src, tgt, cfg, params.seed)
    res.empty_t = tgt.empty
    res.grounding = found
    return res, {**diagnostics(res, source.true_categories, target.true_categories), **diag}
