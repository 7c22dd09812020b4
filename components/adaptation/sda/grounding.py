"""Visual grounding of target-only words, without labels (``semantics.word_grounding: visual``).

After stage 1 a word that only target queries use ("rhombus" where the source says "diamond")
still has its random initial embedding: no source query ever trained it, and CSM's content
vectors, L_si and every later stage read it as noise. Its meaning can be read off the unlabeled
target training data. The images whose queries use a word are the images that show what it
names, and the stage-1 model already says how strongly a target image shows each word it knows:
the maximum of its response map to the one-word query ``"the <word>"``. A target-only word is
grounded to the known word whose presence over the target images best follows the word's
occurrence (Pearson correlation over images, one row per image), when that correlation reaches
``semantics.grounding_min_score``; its embedding row then takes the known word's vector.

The default score is chance's own level (``grounding_min_score: chance``): the correlation
that the best of all (target-only word, probe word) pairs reaches when the images' queries are
paired with other images at random, exceeded by chance with probability
``semantics.grounding_alpha`` (a max-statistic permutation test, which holds that error rate
over all the pairs tested at once). It follows the data's size: a fixed score is too strict
for a dataset of many images and too lax for one of few.

This is cross-situational word learning: it reads the target queries' text and images and the
stage-1 model, never a target mask or category.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from components.data.dataset import SplitArrays, to_batch
from components.data.vocab import Vocab, tokenize

#: the query a known word is probed with (the source domain's template)
PROBE = "the {}"
#: what the ``semantics`` stage writes (``Grounding.to_json``)
FILE = "word_grounding.json"


@dataclass
class Grounding:
    """What grounding found: every target-only word considered, the probe words, their
    correlation matrix and the words grounded (``word -> (known word, correlation)``)."""

    unseen: list[str]
    known: list[str]
    scores: np.ndarray  # (len(unseen), len(known))
    mapping: dict[str, tuple[str, float]] = field(default_factory=dict)
    threshold: float = float("nan")  # the least score grounded (a given one, or chance's)

    def to_json(self) -> dict:
        considered = {}
        if self.known:  # each target-only word's best probe, grounded or not
            for i, (u, j) in enumerate(zip(self.unseen, self.scores.argmax(1), strict=True)):
                considered[u] = {"best": self.known[j], "score": round(float(self.scores[i, j]), 4)}
        return {
            "grounded": {
                u: {"word": k, "score": round(s, 4)} for u, (k, s) in self.mapping.items()
            },
            "considered": considered,
            "probes": self.known,
            "threshold": None if np.isnan(self.threshold) else round(self.threshold, 4),
        }

    def words(self) -> dict[str, str]:
        """The ``word -> known word`` map (what :func:`apply_grounding` copies)."""
        return {u: k for u, (k, _) in self.mapping.items()}

    @classmethod
    def from_json(cls, raw: dict) -> dict[str, str]:
        """The ``word -> known word`` map of a written grounding."""
        return {u: v["word"] for u, v in raw["grounded"].items()}


def word_images(queries: Sequence[str], image_of: np.ndarray, n_images: int) -> dict[str, set]:
    """Each word -> the images (indices) whose queries use it."""
    out: dict[str, set] = {}
    for text, img in zip(queries, image_of, strict=True):
        for w in tokenize(text):
            out.setdefault(w, set()).add(int(img))
    return out


def candidate_words(
    source_queries: Sequence[str], target_uses: dict[str, set], n_images: int, min_images: int
) -> tuple[list[str], list[str]]:
    """(target-only words used by at least ``min_images`` target images, probe words).

    Probe words are the source queries' words, except those in more than half of them
    (articles and templates, which name nothing)."""
    counts: dict[str, int] = {}
    for text in source_queries:
        for w in set(tokenize(text)):
            counts[w] = counts.get(w, 0) + 1
    known = sorted(w for w, c in counts.items() if c <= len(source_queries) / 2)
    unseen = sorted(
        w
        for w, imgs in target_uses.items()
        if w not in counts and min_images <= len(imgs) < n_images
    )
    return unseen, known


@torch.no_grad()
def presence(
    model: nn.Module,
    data: SplitArrays,
    rows: np.ndarray,
    probes: list[str],
    vocab: Vocab,
    max_words: int,
    batch_size: int = 64,
) -> np.ndarray:
    """(len(rows), len(probes)): the model's maximum response on the image of each of ``rows``
    to each probe word's query ``PROBE.format(word)``."""
    model.eval()
    device = next(model.parameters()).device
    encoded = [vocab.encode(PROBE.format(w), max_words) for w in probes]
    out = np.zeros((len(rows), len(probes)), np.float32)
    for start in range(0, len(rows), batch_size):
        idx = rows[start : start + batch_size]
        b = to_batch(data, idx, device)
        split = hasattr(model, "encode_image")  # SDA's network: the image is encoded once
        feats = model.encode_image(b["image"], b.get("clip")) if split else None
        for j, (tokens, length) in enumerate(encoded):
            tok = torch.from_numpy(tokens).to(device).expand(len(idx), -1)
            lengths = torch.full((len(idx),), length, dtype=torch.int64)
            if split:
                out_j = model.decode(feats, tok, lengths, b["superpixels"])
            else:
                out_j = model(b["image"], tok, lengths, b["superpixels"])
            out[start : start + len(idx), j] = out_j["response"].flatten(1).amax(1).cpu().numpy()
    return out


def standardized(x: np.ndarray) -> np.ndarray:
    """Columns of ``x`` centred and scaled to unit norm (all zero where a column is constant),
    so that ``standardized(a).T @ standardized(b)`` is the Pearson correlation of columns."""
    centred = x - x.mean(0)
    norm = np.sqrt((centred**2).sum(0))
    # constant: all values equal (centring may leave rounding noise, which must not count)
    varies = x.max(0) > x.min(0)
    return np.divide(centred, norm, out=np.zeros_like(centred), where=varies & (norm > 0))


def correlation(occurs: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Pearson correlation over rows of every column of ``occurs`` (I, U) with every column of
    ``present`` (I, K): (U, K); 0 where a column is constant."""
    return standardized(occurs).T @ standardized(present)


#: random pairings of the chance level (:func:`chance_level`); ``semantics.grounding_alpha``
#: is at least its inverse
PERMUTATIONS = 1000


def chance_level(
    occurs: np.ndarray, present: np.ndarray, alpha: float, rng: np.random.Generator
) -> float:
    """The score chance exceeds with probability ``alpha``: the (1 - ``alpha``) quantile, over
    :data:`PERMUTATIONS` random pairings of the rows of ``occurs`` (I, U) with those of
    ``present`` (I, K), of the largest correlation of any (column of ``occurs``, column of
    ``present``) pair. A pairing keeps each word's image count and which words share images,
    and breaks only the link between an image's queries and its content. One-sided, as
    grounding is: only a word that follows a probe is grounded."""
    a, b = standardized(occurs), standardized(present)  # a row permutation keeps both
    maxima = [(a[rng.permutation(len(a))].T @ b).max() for _ in range(PERMUTATIONS)]
    return float(np.quantile(maxima, 1 - alpha))


def ground_words(
    model: nn.Module,
    source: SplitArrays,
    target: SplitArrays,
    vocab: Vocab,
    max_words: int,
    min_score: float | None,
    alpha: float,
    seed: int,
    min_images: int = 5,
) -> Grounding:
    """Ground the target-only words of ``target``'s queries on the stage-1 ``model``: a word
    takes its best probe when their correlation reaches ``min_score``, or with ``min_score``
    None, chance's level at ``alpha`` (:func:`chance_level`, its pairings drawn from
    ``seed``)."""
    first, image_of = target.images_index()
    uses = word_images(target.queries, image_of, len(first))
    unseen, known = candidate_words(source.queries, uses, len(first), min_images)
    if not unseen or not known:
        given = float("nan") if min_score is None else float(min_score)
        return Grounding(unseen, known, np.zeros((len(unseen), len(known))), {}, given)
    occurs = np.zeros((len(first), len(unseen)), np.float64)
    for j, w in enumerate(unseen):
        occurs[sorted(uses[w]), j] = 1.0
    present = presence(model, target, first, known, vocab, max_words).astype(np.float64)
    scores = correlation(occurs, present)
    if min_score is None:
        min_score = chance_level(occurs, present, alpha, np.random.default_rng(seed))
    mapping = best_matches(scores, unseen, known, min_score)
    return Grounding(unseen, known, scores, mapping, float(min_score))


def best_matches(
    scores: np.ndarray, unseen: list[str], known: list[str], min_score: float
) -> dict[str, tuple[str, float]]:
    """Each word of ``unseen`` -> (its best word of ``known``, score) where that score (a row
    of ``scores``) reaches ``min_score`` and is positive (chance's level is 0 when no probe's
    response varies over the images)."""
    mapping = {}
    for i, u in enumerate(unseen):
        j = int(scores[i].argmax())
        if scores[i, j] >= min_score and scores[i, j] > 0:
            mapping[u] = (known[j], float(scores[i, j]))
    return mapping


def word_table(model: nn.Module) -> nn.Embedding | None:
    """The network's word embedding table W (None for a text encoder without one)."""
    query = getattr(model, "query", None)
    embed = getattr(query, "embed", None)
    return embed if isinstance(embed, nn.Embedding) else None


@torch.no_grad()
def apply_grounding(model: nn.Module, vocab: Vocab, mapping: dict[str, str]) -> int:
    """Copy each grounded word's known-word vector into its row of W; returns rows changed.

    Raises:
        ValueError: the network has no word table, or a word is not in ``vocab``.
    """
    if not mapping:
        return 0
    table = word_table(model)
    if table is None:
        raise ValueError(
            "word grounding: the network has no word table W (text_encoder: gru has one)"
        )
    for u, k in mapping.items():
        if u not in vocab.stoi or k not in vocab.stoi:
            raise ValueError(f"grounded word {u!r} -> {k!r} is not in the vocabulary")
        table.weight[vocab.stoi[u]] = table.weight[vocab.stoi[k]]
    return len(mapping)


def agreement(found: Grounding, truth: dict[str, str]) -> dict[str, float]:
    """A diagnostic against a known word map (the embedded benchmark's synonym table; never used
    for training): the share of grounded words mapped right (precision) and the share of the
    target-only words ``truth`` names that were grounded right (recall)."""
    right = sum(truth.get(u) == k for u, k in found.words().items())
    named = [u for u in found.unseen if u in truth]
    return {
        "grounding_precision": right / len(found.mapping) if found.mapping else 0.0,
        "grounding_recall": right / len(named) if named else 0.0,
    }


def load_grounding(folder: Path) -> dict[str, str]:
    """The ``word -> known word`` map the ``semantics`` stage wrote to ``folder`` (empty when it
    grounded nothing or ran without ``word_grounding``)."""
    path = Path(folder) / FILE
    return Grounding.from_json(json.loads(path.read_text())) if path.exists() else {}
