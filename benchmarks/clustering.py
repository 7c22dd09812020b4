"""Semantic-construction clustering at RefCOCO scale: 150k content vectors.

    python benchmarks/clustering.py --n 150000

Synthetic contents: 400 prototype directions in 64-d, each sample a noisy copy, a third of
them exact duplicates (repeated queries attend the same words). Reports wall time and peak
resident memory of ``cluster_contents`` (dedup + pre-clustering), and, on a 6k subset where
plain agglomerative clustering still fits, its agreement with the exact result (ARI).
Writes benchmarks/results/clustering.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import adjusted_rand_score

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from components.adaptation.sda.clustering import agglomerative, cluster_contents  # noqa: E402


def contents(n: int, dim: int = 64, k: int = 400, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, dim))
    base = centres[rng.integers(k, size=n - n // 3)] + 0.15 * rng.normal(size=(n - n // 3, dim))
    dups = base[rng.integers(len(base), size=n // 3)]
    return np.concatenate([base, dups]).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=150_000)
    ap.add_argument("--threshold", type=float, default=0.5)
    args = ap.parse_args()
    x = contents(args.n)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    labels = cluster_contents(x, args.threshold)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    sub = contents(6000, seed=1)
    unit = sub / np.linalg.norm(sub, axis=1, keepdims=True)
    exact = agglomerative(unit, args.threshold)
    approx = cluster_contents(sub, args.threshold, max_exact=1000)  # forces pre-clustering
    out = {
        "n": args.n,
        "seconds": seconds,
        "peak_rss_mib": peak,
        "rss_before_mib": rss0,
        "clusters": int(labels.max()) + 1,
        "plain_agglomerative_distance_matrix_gib": args.n * (args.n - 1) / 2 * 8 / 2**30,
        "ari_precluster_vs_exact_6k": adjusted_rand_score(exact, approx),
        "ari_dedup_vs_exact_6k": adjusted_rand_score(exact, cluster_contents(sub, args.threshold)),
    }
    (ROOT / "benchmarks/results/clustering.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
