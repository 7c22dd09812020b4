"""Word grounding of target-only words (``semantics.word_grounding: visual``)."""

import json

import numpy as np
import pytest
import torch

from components.adaptation.sda.grounding import (
    PERMUTATIONS,
    Grounding,
    agreement,
    apply_grounding,
    best_matches,
    candidate_words,
    chance_level,
    correlation,
    load_grounding,
    word_images,
)
from components.config import ModelConfig, ParamsError, parse_params
from components.data.synthetic import synonym_map
from components.data.vocab import Vocab
from components.models.network import build_model, load_trained
from tests.conftest import real_params, run_in


def test_correlation_by_hand():
    occurs = np.array([[1, 1], [0, 1], [1, 1], [0, 1]], float)  # word a: images 0, 2; b: all
    present = np.array([[0.9, 0.1], [0.2, 0.8], [0.8, 0.3], [0.1, 0.7]])
    r = correlation(occurs, present)
    assert r.shape == (2, 2)
    assert r[0, 0] > 0.95 and r[0, 1] < -0.9  # a follows the first probe, not the second
    assert r[1].tolist() == [0.0, 0.0]  # a word in every image says nothing: no NaN


def test_chance_level_keeps_chance_out_and_lets_a_real_word_in():
    """With nothing linking words to images, the best of many pairs still correlates by
    chance; the chance level sits above it (in 1 - alpha of the draws) and well under a word
    that does follow a probe. Fewer images: a higher level."""
    rng = np.random.default_rng(0)
    images, words, probes = 400, 15, 25
    hits = 0
    for draw in range(20):
        occurs = (rng.random((images, words)) < 0.2).astype(float)
        present = rng.random((images, probes))
        level = chance_level(occurs, present, 0.05, np.random.default_rng(draw))
        hits += correlation(occurs, present).max() >= level
    assert hits <= 4  # chance crosses it about once in 20 draws (5 %)
    assert 0.1 < level < 0.3  # ~ 3.5 standard errors of r at 400 images
    # a word that names what probe 3 finds: present where it is used, plus noise
    occurs[:, 0] = rng.random(images) < 0.2
    present[:, 3] = occurs[:, 0] * 0.3 + rng.random(images)
    assert correlation(occurs, present)[0, 3] > level
    few = chance_level(occurs[:100], present[:100], 0.05, np.random.default_rng(0))
    assert few > level
    assert chance_level(occurs, present, 0.01, np.random.default_rng(0)) > level


def test_nothing_is_grounded_on_probes_that_never_vary():
    """A stage-1 model whose responses are the same on every image says nothing: chance's level
    is then 0, and a score of 0 grounds no word."""
    occurs = (np.random.default_rng(0).random((50, 3)) < 0.3).astype(float)
    present = np.full((50, 4), 0.7)
    level = chance_level(occurs, present, 0.05, np.random.default_rng(0))
    assert level == 0.0
    assert best_matches(correlation(occurs, present), ["a", "b", "c"], list("wxyz"), level) == {}
    scores = np.array([[0.1, 0.3], [0.05, 0.02]])
    assert best_matches(scores, ["a", "b"], ["x", "y"], 0.2) == {"a": ("y", 0.3)}


def test_alpha_cannot_ask_more_than_the_permutations_resolve():
    raw = real_params()
    raw["semantics"]["grounding_alpha"] = 1 / PERMUTATIONS
    assert parse_params(raw).semantics.grounding_alpha == 1 / PERMUTATIONS
    raw["semantics"]["grounding_alpha"] = 0.5 / PERMUTATIONS
    with pytest.raises(ParamsError, match="semantics.grounding_alpha"):
        parse_params(raw)


def test_candidates_leave_out_templates_and_words_in_every_image():
    source = ["the red ball", "the blue ball", "the red box", "the green box"]
    target = ["find the crimson ball", "find the navy ball", "find the emerald box"]
    uses = word_images(target, np.array([0, 1, 2]), 3)
    assert uses["ball"] == {0, 1} and uses["find"] == {0, 1, 2}
    unseen, known = candidate_words(source, uses, 3, min_images=1)
    assert unseen == ["crimson", "emerald", "navy"]  # "find" is in every image
    assert "the" not in known and {"red", "ball", "box"} <= set(known)
    assert candidate_words(source, uses, 3, min_images=2)[0] == []


def test_grounded_rows_copy_the_known_word_and_agreement_scores_them():
    vocab = Vocab(["the", "red", "crimson", "ball"])
    model = build_model(ModelConfig(), len(vocab))
    table = model.query.embed.weight
    before = table.detach().clone()
    assert apply_grounding(model, vocab, {"crimson": "red"}) == 1
    assert torch.equal(table[vocab.stoi["crimson"]], before[vocab.stoi["red"]])
    assert torch.equal(table[vocab.stoi["ball"]], before[vocab.stoi["ball"]])
    with pytest.raises(ValueError, match="'amber'"):
        apply_grounding(model, vocab, {"amber": "red"})
    found = Grounding(
        ["crimson", "navy", "rhombus"],
        ["red", "blue"],
        np.array([[0.6, 0.1], [0.5, 0.2], [0.1, 0.1]]),
        {"crimson": ("red", 0.6), "navy": ("red", 0.5)},
    )
    assert synonym_map()["crimson"] == "red" and "to the left of" not in synonym_map()
    assert agreement(found, synonym_map()) == {
        "grounding_precision": 0.5,  # navy -> red is wrong
        "grounding_recall": pytest.approx(1 / 3),  # rhombus was not grounded
    }
    assert Grounding.from_json(found.to_json()) == {"crimson": "red", "navy": "red"}


def test_semantics_grounds_words_and_init_starts_from_them(repo):
    """The stage writes what it grounded, with its agreement in the metrics, and `init` trains
    from the stage-1 model whose target-only rows took their known words' vectors."""
    sets = ["-S", "semantics.word_grounding=visual", "-S", "semantics.grounding_min_score=0.01"]
    run_in(repo, "adaseg", *sets, "semantics", "--data", "data/prepared", "--model",
           "models/source_only", "--out", "g/semantics",
           "--metrics", "g/semantics.json")  # fmt: skip
    metrics = json.loads((repo / "g/semantics.json").read_text())
    assert metrics["target_only_words"] > 0
    assert 0 <= metrics["grounding_precision"] <= 1
    written = json.loads((repo / "g/semantics/word_grounding.json").read_text())
    assert set(written["considered"]) and set(written["grounded"]) <= set(written["considered"])
    assert written["threshold"] == 0.01 == metrics["grounding_threshold"]
    mapping = load_grounding(repo / "g/semantics")
    assert len(mapping) == metrics["grounded_words"] > 0
    run_in(repo, "adaseg", *sets, "init", "--data", "data/prepared", "--base",
           "models/source_only", "--semantics", "g/semantics", "--out", "g/init",
           "--metrics", "g/init.json", "--plots", "g/init.csv")  # fmt: skip
    vocab = Vocab.load(repo / "data/prepared/vocab.json")
    stage1, _ = load_trained(repo / "models/source_only")
    init, _ = load_trained(repo / "g/init")
    w1, w2 = stage1.query.embed.weight, init.query.embed.weight
    for word, known in mapping.items():
        # no source query uses the word, so source training leaves its copied row as it was
        assert torch.equal(w2[vocab.stoi[word]], w1[vocab.stoi[known]]), word


@pytest.mark.parametrize("arch", ["sda", "dmmi"])
def test_presence_is_the_response_maximum_to_each_probe(arch):
    from components.adaptation.sda.grounding import presence
    from components.data.dataset import SplitArrays

    rng = np.random.default_rng(0)
    n, size = 3, 32
    vocab = Vocab(["the", "red", "ball"])
    data = SplitArrays(
        sample_ids=[f"s{i}" for i in range(n)],
        query_types=["one"] * n,
        queries=["the red"] * n,
        images=rng.integers(0, 255, (n, size, size, 3), dtype=np.uint8),
        masks=np.zeros((n, size, size), bool),
        superpixels=rng.integers(0, 10, (n, size, size)).astype(np.int16),
        tokens=np.zeros((n, 6), np.int64),
        lengths=np.ones(n, np.int64),
        true_categories=np.zeros(n, np.int64),
    )
    cfg = ModelConfig(arch=arch, widths=[8, 16, 16, 24], hidden=16, embed_dim=8)
    torch.manual_seed(0)
    model = build_model(cfg, len(vocab)).eval()
    got = presence(model, data, np.arange(n), ["red", "ball"], vocab, 6, batch_size=2)
    tokens, length = vocab.encode("the ball", 6)
    with torch.no_grad():
        image = (torch.from_numpy(data.images).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
        whole = model(
            image,
            torch.from_numpy(tokens).expand(n, -1),
            torch.full((n,), length),
            torch.from_numpy(data.superpixels).long(),
        )["response"]
    assert got.shape == (n, 2)
    np.testing.assert_allclose(got[:, 1], whole.flatten(1).amax(1).numpy(), rtol=1e-5)
