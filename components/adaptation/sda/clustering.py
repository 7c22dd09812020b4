"""Clustering of content features for semantic construction (SDA Section 3.2, Appendix D.1).

Agglomerative clustering with a distance threshold (the paper's choice: no cluster count to set)
runs on L2-normalised features with cosine distance and *complete* linkage: a category is a set
of contents whose pairwise cosine distance stays under the threshold (assumed; the paper does
not name the linkage or metric).

Plain agglomerative clustering needs the full distance matrix (quadratic memory: 150k
expressions would need ~90 GB). ``cluster_contents`` makes it scale in two exact-or-bounded
steps:

1. exact de-duplication: identical content vectors (very common: many queries attend the same
   words) are clustered once. With complete linkage this is *exact*: a duplicate never changes
   the maximum pairwise distance between two clusters;
2. if more than ``max_exact`` distinct vectors remain, MiniBatchKMeans pre-clusters them into
   ``max_exact`` micro-clusters whose centres are clustered agglomeratively, and every vector
   takes its centre's category. This is the approximation; the micro-clusters are far finer
   than the threshold, so the result stays close to the exact one.

Memory is then bounded by ``max_exact**2`` distances (~200 MB for 5000) whatever the input size.
K-means and spectral clustering (with a cluster count) are there for the ablation of Table D.1.
"""

from __future__ import annotations

import logging

import numpy as np
from sklearn.cluster import AgglomerativeClustering, KMeans, MiniBatchKMeans, SpectralClustering

log = logging.getLogger(__name__)

ALGORITHMS = ("agglomerative", "kmeans", "spectral")


def normalise(x: np.ndarray) -> np.ndarray:
    return x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)


def agglomerative(x: np.ndarray, threshold: float) -> np.ndarray:
    """Plain complete-linkage cosine agglomerative clustering (quadratic memory)."""
    if len(x) == 1:
        return np.zeros(1, dtype=np.int64)
    model = AgglomerativeClustering(
        n_clusters=None, distance_threshold=threshold, metric="cosine", linkage="complete"
    )
    return model.fit_predict(x).astype(np.int64)


def cluster_contents(
    x: np.ndarray,
    threshold: float,
    algorithm: str = "agglomerative",
    n_clusters: int | None = None,
    max_exact: int = 5000,
    seed: int = 0,
) -> np.ndarray:
    """Category label (0..k-1) of every row of ``x`` (M, E).

    Args:
        threshold: cosine distance threshold (agglomerative only).
        algorithm: "agglomerative" (default), "kmeans" or "spectral" (need ``n_clusters``).
        max_exact: largest number of distinct vectors clustered exactly.
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown clustering algorithm {algorithm!r}; choose from {ALGORITHMS}")
    if len(x) == 0:
        return np.zeros(0, dtype=np.int64)
    xn = normalise(np.asarray(x, dtype=np.float64))
    uniq, inverse = np.unique(np.round(xn, 6), axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    if algorithm != "agglomerative":
        if not n_clusters:
            raise ValueError(f"clustering algorithm {algorithm!r} needs n_clusters")
        k = min(n_clusters, len(uniq))
        if algorithm == "kmeans":
            labels = KMeans(k, n_init=4, random_state=seed).fit_predict(uniq)
        else:
            labels = (
                SpectralClustering(
                    k,
                    affinity="nearest_neighbors",
                    n_neighbors=min(10, len(uniq) - 1) or 1,
                    random_state=seed,
                ).fit_predict(uniq)
                if len(uniq) > k
                else np.arange(len(uniq))
            )
        return _relabel(labels[inverse])
    if len(uniq) <= max_exact:
        return _relabel(agglomerative(uniq, threshold)[inverse])
    log.info("pre-clustering %d distinct vectors into %d micro-clusters", len(uniq), max_exact)
    km = MiniBatchKMeans(max_exact, batch_size=4096, n_init=1, random_state=seed).fit(uniq)
    centres = normalise(km.cluster_centers_)
    labels = agglomerative(centres, threshold)[km.labels_]
    return _relabel(labels[inverse])


def _relabel(labels: np.ndarray) -> np.ndarray:
    """Dense labels 0..k-1 in order of first appearance (stable across runs)."""
    _, first, inv = np.unique(labels, return_index=True, return_inverse=True)
    order = np.argsort(np.argsort(first))
    return order[inv].astype(np.int64)


def prototypes(x: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Cluster means (k, E) of the raw features (the ``C^s`` of Eq. 2)."""
    k = int(labels.max()) + 1 if len(labels) else 0
    return np.stack([x[labels == c].mean(0) for c in range(k)]) if k else np.zeros((0, x.shape[1]))
