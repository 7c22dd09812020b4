"""Content-aware Semantic Modeling (SDA Section 3.2, Eqs. 1-3; Appendix B.1).

* Attentive extraction (Eq. 1): visual-guided word weights ``alpha_bar`` from the interaction
  attention over annotated foreground pixels, sharpened by ``tau`` and combined with the word
  *embeddings* W into a content feature H.
* The predictor (Appendix B.1): a two-layer MLP on W trained (everything else frozen) to
  reproduce ``alpha_bar`` on source, used on target where no mask is available.
* Semantic construction (Eq. 2): target-to-prototype similarity, entropy boundary
  ``rho = beta * log(k_s)``; reliable target samples join their nearest source category, the
  others are clustered into ``k_u`` extra categories (see ``clustering.py``).
* Semantic initialisation (Eq. 3): the prototypical contrastive loss ``L_si``.

Choices where the paper is silent or inconsistent (all "assumed"):
* Eq. 1 is written with ``1 / (H W)`` but the text says "averaging over all foreground pixels";
  we average over the foreground (the written form makes every weight tiny, so ``tau`` would
  barely sharpen anything). Padded words are excluded everywhere; ``1/N`` uses real words.
* Eq. 2 is computed on L2-normalised H and prototypes divided by a temperature
  (``semantics.similarity_temperature``, 0.05): raw dot products make the distribution's
  sharpness depend on the embedding scale (near-uniform for our 64-d learned embeddings, so no
  target sample would ever fall under the entropy boundary). Clustering also runs on
  L2-normalised H (cosine geometry, see ``clustering.py``).
* ``L_si`` compares L2-normalised pixel features with L2-normalised prototypes divided by a
  temperature (0.1), prototypes being an EMA (0.9) of per-category foreground means.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


# --------------------------------------------------------------------------- Eq. 1
def visual_guided_weights(
    alpha: torch.Tensor, fg: torch.Tensor, word_mask: torch.Tensor
) -> torch.Tensor:
    """``alpha_bar``: attention averaged over foreground pixels, renormalised over real words.

    Args:
        alpha: (B, P, N) pixel-to-word attention; fg: (B, P) foreground weights in [0, 1];
        word_mask: (B, N) True for real words.
    Returns:
        (B, N) weights summing to 1 over real words (uniform where a sample has no foreground).
    """
    mass = fg.sum(1, keepdim=True)  # (B, 1)
    bar = (alpha * fg.unsqueeze(-1)).sum(1) / mass.clamp_min(1e-6)  # (B, N)
    bar = bar * word_mask
    uniform = word_mask.float() / word_mask.sum(1, keepdim=True)
    bar = torch.where(mass > 0, bar / bar.sum(1, keepdim=True).clamp_min(1e-12), uniform)
    return bar


def content_features(
    weights: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor, tau: float
) -> torch.Tensor:
    """Eq. 1: ``H = 1/N sum_n softmax(alpha_bar / tau)_n w_n``.

    Args:
        weights: (B, N) word weights (``alpha_bar``); words: (B, N, E) embeddings W (or Q);
        word_mask: (B, N); tau: temperature > 0.
    Returns:
        (B, E) content features.
    """
    logits = (weights / tau).masked_fill(~word_mask, float("-inf"))
    tilde = logits.softmax(-1)  # (B, N)
    n = word_mask.sum(1, keepdim=True).clamp_min(1)
    return (tilde.unsqueeze(-1) * words).sum(1) / n


def mean_pool_text(words: torch.Tensor, word_mask: torch.Tensor) -> torch.Tensor:
    """Ablation ``mean-pooling(t)``: the plain mean of the query's word features."""
    m = word_mask.unsqueeze(-1).float()
    return (words * m).sum(1) / m.sum(1).clamp_min(1)


def mean_pool_visual(features: torch.Tensor, fg: torch.Tensor) -> torch.Tensor:
    """Ablation ``mean-pooling(v)``: mean visual feature over the (predicted) foreground.

    Args:
        features: (B, C, h, w); fg: (B, h*w) weights in [0, 1].
    """
    flat = features.flatten(2)  # (B, C, P)
    return (flat * fg.unsqueeze(1)).sum(-1) / fg.sum(1, keepdim=True).clamp_min(1e-6)


# --------------------------------------------------------------------------- Appendix B.1
class WordImportancePredictor(nn.Module):
    """Two-layer MLP: word embedding -> importance logit; softmax over the query's words."""

    def __init__(self, embed_dim: int, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(embed_dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, words: torch.Tensor, word_mask: torch.Tensor) -> torch.Tensor:
        logits = self.net(words).squeeze(-1).masked_fill(~word_mask, float("-inf"))
        return logits.softmax(-1)  # (B, N)


def predictor_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """Distillation loss of Appendix B.1 (L1 in the paper; KL available)."""
    if kind == "l1":
        return (pred - target).abs().sum(-1).mean()
    return F.kl_div(pred.clamp_min(1e-12).log(), target, reduction="batchmean")


# --------------------------------------------------------------------------- Eq. 2
def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)


def similarity_distribution(
    h: np.ndarray, prototypes: np.ndarray, temperature: float = 0.05
) -> np.ndarray:
    """Eq. 2: softmax over source prototypes of ``cos(H_i, C_j) / temperature``.

    Args:
        h: (M, E) target contents; prototypes: (k_s, E). Returns (M, k_s).
    """
    logits = _unit(h) @ _unit(prototypes).T / temperature
    logits -= logits.max(1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(1, keepdims=True)


def entropy(d: np.ndarray) -> np.ndarray:
    return -(d * np.log(np.clip(d, 1e-12, None))).sum(1)


def assign_target(
    h_t: np.ndarray,
    prototypes: np.ndarray,
    beta: float,
    use_boundary: bool = True,
    temperature: float = 0.05,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nearest source category and reliability of each target sample.

    Returns:
        (nearest category (M,), entropy (M,), reliable mask (M,)). Reliable means
        ``H(d) < beta * log(k_s)``; with one source category every sample is reliable (the
        entropy is 0 and so is the boundary), and without the boundary (ablation) all are.
    """
    d = similarity_distribution(h_t, prototypes, temperature)
    ent = entropy(d)
    k_s = prototypes.shape[0]
    if not use_boundary or k_s == 1:
        reliable = np.ones(len(h_t), dtype=bool)
    else:
        reliable = ent < beta * np.log(k_s)
    return d.argmax(1), ent, reliable


# --------------------------------------------------------------------------- Eq. 3
class PrototypeBank:
    """EMA visual prototypes ``U`` (k, C) of foreground pixel features per category."""

    def __init__(self, num_categories: int, dim: int, momentum: float = 0.9):
        self.protos = torch.zeros(num_categories, dim)
        self.seen = torch.zeros(num_categories, dtype=torch.bool)
        self.momentum = momentum

    @torch.no_grad()
    def update(self, feats: torch.Tensor, labels: torch.Tensor) -> None:
        """feats: (M, C) L2-normalised foreground pixels; labels: (M,) category ids."""
        self.protos = self.protos.to(feats.device)
        self.seen = self.seen.to(feats.device)
        for c in labels.unique():
            mean = F.normalize(feats[labels == c].mean(0), dim=0)
            if self.seen[c]:
                mean = F.normalize(
                    self.momentum * self.protos[c] + (1 - self.momentum) * mean, dim=0
                )
            self.protos[c] = mean
            self.seen[c] = True


def semantic_init_loss(
    feats: torch.Tensor, labels: torch.Tensor, bank: PrototypeBank, temperature: float = 0.1
) -> torch.Tensor:
    """Eq. 3: cross-entropy of foreground pixels against the category prototypes.

    Args:
        feats: (M, C) foreground pixel features (any scale; normalised here);
        labels: (M,) category of each pixel's sample.
    Returns:
        A scalar; zero (with a gradient path) when fewer than two categories have prototypes,
        since a softmax over one prototype carries no signal.
    """
    feats = F.normalize(feats, dim=1)
    bank.update(feats.detach(), labels)
    if int(bank.seen.sum()) < 2 or feats.shape[0] == 0:
        return feats.sum() * 0.0
    logits = feats @ bank.protos.T / temperature  # (M, k)
    logits = logits.masked_fill(~bank.seen.unsqueeze(0), float("-inf"))
    return F.cross_entropy(logits, labels)
