"""The embedded benchmark: deterministic, well-formed, and each gap knob does what it claims."""

import numpy as np
import pytest

from components.config import DataConfig, GapConfig
from components.data.synthetic import COLOR_NAMES, SYNONYMS, generate_range, generate_sample

#: First 16 hex digits of a digest of source and target train samples 0-5 of seed 0, recorded
#: with the v3 generator (one query per image).
V3_DIGEST = "3dff6d0dbfb79c74"


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
    def hist(domain):  # over 200 images (each image's objects once)
        images = {s["image_id"]: s for s in _samples(cfg, domain, n=200 * cfg.queries_per_image)}
        cats = [c for s in images.values() for c in s["instance_categories"]]
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
        qs = [s["query"] for s in _samples(cfg, domain, n=600)]
        return np.mean([any(c in q.split() for c in COLOR_NAMES) for q in qs])

    return rate("source") - rate("target")


def test_relation_bias_changes_which_attributes_queries_mention():
    none = _colour_mention_gap(_cfg(relation_bias=0.0))
    assert abs(none) < 0.15
    assert _colour_mention_gap(_cfg(relation_bias=0.9)) > none + 0.08


def test_an_image_carries_several_queries_of_several_objects():
    """Benchmark v4: the queries of an image share its pixels, objects and id; its one-to-one
    queries refer to several objects, most of them by more than one expression."""
    cfg = DataConfig(queries_per_image=4, expressions_per_object=2)
    samples = _samples(cfg, "target", n=400)
    by_image: dict[str, list[dict]] = {}
    for s in samples:
        by_image.setdefault(s["image_id"], []).append(s)
    assert len(by_image) == 100 and all(len(g) == 4 for g in by_image.values())
    referents, per_referent = [], []
    for group in by_image.values():
        for s in group[1:]:
            assert np.array_equal(s["image"], group[0]["image"])
            assert s["instance_categories"] == group[0]["instance_categories"]
        assert len({s["query"] for s in group}) >= 3  # a repeated expression is the exception
        ones = [s["target"].tobytes() for s in group if s["query_type"] == "one"]
        if len(group[0]["instances"]) >= 2 and len(ones) >= 3:
            referents.append(len(set(ones)))
        per_referent += [ones.count(t) for t in set(ones)]
    assert np.mean(referents) >= 1.9  # several referred objects per image
    assert np.mean(per_referent) > 1.5  # more than one expression per object


def test_splits_count_queries_and_no_image_is_shared_by_two_splits():
    cfg = DataConfig(queries_per_image=4)
    train = generate_range(cfg, 0, "source", "train", 0, 10)  # 2.5 images
    assert [s["sample_id"] for s in train] == [f"source-train-{i:06d}" for i in range(10)]
    assert len({s["image_id"] for s in train}) == 3
    # any range of a split gives the same samples as the whole split (shards cut images)
    again = generate_range(cfg, 0, "source", "train", 6, 10)
    assert [s["query"] for s in again] == [s["query"] for s in train[6:]]
    val = generate_range(cfg, 0, "source", "val", 0, 10)
    assert not {s["image_id"] for s in train} & {s["image_id"] for s in val}


def test_one_query_per_image_is_benchmark_v3():
    """At ``queries_per_image: 1`` every sample is the v3 one: pinned by a digest of a few
    samples recorded with the v3 generator."""
    import hashlib

    cfg = DataConfig(queries_per_image=1)
    digest = hashlib.sha256()
    for domain in ("source", "target"):
        for s in generate_range(cfg, 0, domain, "train", 0, 6):
            assert s["image_id"] == s["sample_id"]
            digest.update(s["image"].tobytes() + s["target"].tobytes() + s["query"].encode())
    assert digest.hexdigest()[:16] == V3_DIGEST
