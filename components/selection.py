"""Label-free model selection: criteria that rank adapted models without target labels.

A sweep over an adaptation method's hyperparameters needs an objective; a labeled target
split is what UDA assumes away. The criteria here are the ones the UDA model-selection
literature validates, computed on target images (their labels never read) and, for DEV and the
source-val metric, on the labeled source val split. Every one is reported so that higher is
better:

* ``unsup_im`` — information maximisation (Liang et al., SHOT, 2020): ``H(mean p) - mean H(p)``
  over sampled target pixels' class distributions, divided by ``log K`` (so in [0, 1]):
  confident and diverse predictions score high; a collapse onto one class scores 0.
* ``unsup_snd`` — soft neighbourhood density (Saito et al., 2021): L2-normalised class
  distributions of sampled target pixels, the softmax over each one's similarities to the
  others (temperature 0.05, self excluded), and the mean entropy of those soft neighbourhoods,
  divided by ``log(N - 1)``: pixels that form dense clusters score high.
* ``unsup_dev`` — deep embedded validation (You et al., 2019), negated: the source-val loss of
  each image weighted by its density ratio ``p(target | x) / p(source | x)`` (times the
  domains' size ratio) from a logistic-regression domain classifier on pooled pixel features
  (scikit-learn; out-of-fold probabilities, so a sample never scores itself), with the paper's
  control variate; ``-risk``.
* ``src_val_<metric>`` — the task's validation metrics on labeled source val.

Segmentation adaptations of classification criteria: a "sample" for IM and SND is a pixel
(``pixels`` drawn per target image, seeded), for DEV an image (its pooled pixel features and its
mean pixel cross-entropy).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from components.data.dataset import SplitArrays, iterate_batches, to_batch

#: temperature of SND's soft neighbourhoods (the paper's value)
SND_TEMPERATURE = 0.05


def information_maximization(probs: torch.Tensor) -> float:
    """``probs``: (N, K) class distributions -> (H(mean) - mean H) / log K, in [0, 1]."""
    k = probs.shape[1]
    p = probs.double().clamp_min(1e-12)
    marginal = p.mean(0)
    h_marginal = -(marginal * marginal.log()).sum()
    h_mean = -(p * p.log()).sum(1).mean()
    return float((h_marginal - h_mean) / math.log(k))


def soft_neighborhood_density(probs: torch.Tensor, temperature: float = SND_TEMPERATURE) -> float:
    """``probs``: (N, K), N >= 3 -> mean entropy of the soft neighbourhoods / log(N - 1)."""
    n = probs.shape[0]
    if n < 3:
        raise ValueError(f"SND needs at least 3 samples, got {n}")
    f = F.normalize(probs.double(), dim=1)
    sim = f @ f.T / temperature  # (N, N)
    sim.fill_diagonal_(float("-inf"))
    q = sim.softmax(1)
    h = -(q * q.clamp_min(1e-300).log()).sum(1)
    return float(h.mean() / math.log(n - 1))


def deep_embedded_validation(
    src_feats: np.ndarray, src_losses: np.ndarray, tgt_feats: np.ndarray, seed: int = 0
) -> float:
    """DEV risk (lower is better) of a model from (N_s, C) source-val features, their (N_s,)
    losses and (N_t, C) target features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.concatenate([src_feats, tgt_feats]).astype(np.float64)
    y = np.concatenate([np.zeros(len(src_feats)), np.ones(len(tgt_feats))])
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=seed)
    p_t = cross_val_predict(clf, x, y, cv=folds, method="predict_proba")[: len(src_feats), 1]
    p_t = np.clip(p_t, 1e-6, 1 - 1e-6)
    w = p_t / (1 - p_t) * len(src_feats) / len(tgt_feats)  # density ratio target / source
    wl = w * src_losses
    var = np.var(w, ddof=1)
    eta = -np.cov(wl, w, ddof=1)[0, 1] / var if var > 0 else 0.0
    return float(wl.mean() + eta * w.mean() - eta)


@torch.no_grad()
def _pass(task, net, data: SplitArrays, device, labeled: bool, gen: torch.Generator, pixels: int):
    """One pass over ``data``: pooled pixel features (N, C), per-image mean loss (labeled),
    sampled pixel distributions (N * pixels, K) and the IM sums over every pixel."""
    feats, losses, sampled = [], [], []
    for idx in iterate_batches(len(data), 64, shuffle=False):
        batch = to_batch(data, idx, device)
        out = task.forward(net, batch)
        feats.append(task.pixel_features(out).float().mean((2, 3)).cpu())
        logits = task.class_logits(out)  # (B, K, H, W)
        probs = logits.softmax(1)
        if labeled:
            labels = task.class_labels(batch)
            ce = F.cross_entropy(logits, labels, ignore_index=task.ignore_index, reduction="none")
            valid = (labels != task.ignore_index).flatten(1).sum(1).clamp_min(1)
            losses.append((ce.flatten(1).sum(1) / valid).cpu())
        flat = probs.flatten(2).transpose(1, 2)  # (B, HW, K)
        pick = torch.randint(0, flat.shape[1], (flat.shape[0], pixels), generator=gen)
        index = pick.unsqueeze(-1).expand(-1, -1, flat.shape[2])
        sampled.append(torch.gather(flat.cpu(), 1, index))
    sampled_all = torch.cat(sampled).flatten(0, 1)
    return torch.cat(feats).numpy(), torch.cat(losses).numpy() if labeled else None, sampled_all


def selection_metrics(
    task,
    net,
    target: SplitArrays,
    source_val: SplitArrays | None,
    device,
    seed: int = 0,
    pixels: int = 8,
) -> dict[str, float]:
    """Every criterion of this module for ``net`` (labels of ``target`` never read)."""
    net.eval()
    gen = torch.Generator().manual_seed(seed)
    t_feats, _, t_probs = _pass(task, net, target, device, False, gen, pixels)
    out = {
        "unsup_im": information_maximization(t_probs),
        "unsup_snd": soft_neighborhood_density(t_probs),
    }
    if source_val is not None:
        s_feats, s_losses, _ = _pass(task, net, source_val, device, True, gen, 1)
        out["unsup_dev"] = -deep_embedded_validation(s_feats, s_losses, t_feats, seed)
        out.update({f"src_{k}": v for k, v in task.val_metrics(net, source_val, device).items()})
    return out
