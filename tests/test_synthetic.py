"""The embedded benchmark: deterministic, well-formed, and each gap knob does what it claims."""

import numpy as np
import pytest

from components.config import DataConfig, GapConfig
from components.data.synthetic import COLOR_NAMES, SYNONYMS, generate_sample


def _cfg(**gap) -> DataConfig:
    base = {"content_shift": 0.0, "visual_gap": 0.0, "language_gap": 0.0, "relation_bias": 0.0}
    return DataConfig(gap=GapConfig(**{**base, **gap}))


def _samples(cfg, domain, n=150, seed=0, split="train"):
    return [generate_sample(cfg, seed, domain, split, i) for i in range(n)]


def test_deterministic_for_a_seed_and_different_across_seeds():
    cfg = DataConfig()
    a = generate_sample(cfg, 7, "target", "train", 3)
    b = generate_sample(cfg, 7, "target", "train", 3)
    c = generate_sample(cfg, 8, "target", "train", 3)
    assert a["query"] == b["query"] and np.array_equal(a["image"], b["image"])
    assert not np.array_equal(a["image"], c["image"])


def test_masks_are_consistent_with_query_type():
    for s in _samples(DataConfig(), "source", n=120) + _samples(DataConfig(), "target", n=120):
        union = np.zeros_like(s["target"])
        for m, cat in zip(s["instances"], s["instance_categories"], strict=True):
            assert m.any() and 1 <= cat <= 6
            union |= m
        assert not (s["target"] & ~union).any()  # referred pixels belong to objects
        assert np.isin(np.unique(s["semantic"]), range(7)).all()
        n = len(s["target_categories"])
        if s["query_type"] == "zero":
            assert n == 0 and not s["target"].any()
        elif s["query_type"] == "one":
            assert n == 1 and s["target"].any()
        else:
            assert n >= 2 and s["target"].any()


def test_query_mix_proportions():
    cfg = DataConfig(query_mix={"one": 0.5, "many": 0.25, "zero": 0.25})
    kinds = [s["query_type"] for s in _samples(cfg, "source", n=400)]
    assert kinds.count("one") / 400 == pytest.approx(0.5, abs=0.08)
    assert kinds.count("zero") / 400 == pytest.approx(0.25, abs=0.08)


def _category_tv(cfg) -> float:
    def hist(domain):
        cats = [c for s in _samples(cfg, domain, n=200) for c in s["instance_categories"]]
        return np.bincount(cats, minlength=7)[1:] / len(cats)

    return 0.5 * np.abs(hist("source") - hist("target")).sum()


def test_content_shift_changes_category_frequencies():
    assert _category_tv(_cfg(content_shift=0.0)) < 0.1
    assert _category_tv(_cfg(content_shift=0.8)) > 0.3


def _roughness(cfg, domain) -> float:
    """Mean absolute difference between neighbouring pixels (texture, noise)."""
    imgs = np.stack([s["image"].astype(float) for s in _samples(cfg, domain, n=30)])
    return float(np.abs(np.diff(imgs, axis=2)).mean())


def test_visual_gap_changes_only_the_target_style():
    flat, gapped = _cfg(visual_gap=0.0), _cfg(visual_gap=0.8)
    assert _roughness(flat, "source") == pytest.approx(_roughness(gapped, "source"))
    assert _roughness(gapped, "target") > 1.3 * _roughness(flat, "target")


def _synonym_rate(cfg, domain) -> float:
    originals = {w for key in SYNONYMS for w in key.split()}
    words = {w for syns in SYNONYMS.values() for s in syns for w in s.split()} - originals - {"the"}
    qs = [s["query"] for s in _samples(cfg, domain)]
    return np.mean([any(w in words for w in q.split()) for q in qs])


def test_language_gap_brings_target_synonyms():
    assert _synonym_rate(_cfg(language_gap=0.8), "source") == 0.0
    assert _synonym_rate(_cfg(language_gap=0.0), "target") == 0.0
    assert _synonym_rate(_cfg(language_gap=0.8), "target") > 0.5


def _colour_mention_gap(cfg) -> float:
    def rate(domain):
        qs = [s["query"] for s in _samples(cfg, domain)]
        return np.mean([any(c in q.split() for c in COLOR_NAMES) for q in qs])

    return rate("source") - rate("target")


def test_relation_bias_changes_which_attributes_queries_mention():
    none = _colour_mention_gap(_cfg(relation_bias=0.0))
    assert abs(none) < 0.15
    assert _colour_mention_gap(_cfg(relation_bias=0.9)) > none + 0.15
