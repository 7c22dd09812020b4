"""Tokenisation and the word vocabulary shared by the query encoder and every stage."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np

PAD, UNK = "<pad>", "<unk>"
_TOKEN = re.compile(r"[a-z0-9]+")


def tokenize(text: str) -> list[str]:
    """Lower-case alphanumeric words; punctuation is dropped."""
    return _TOKEN.findall(text.lower())


class Vocab:
    """Word <-> id map with ``<pad>`` = 0 and ``<unk>`` = 1."""

    def __init__(self, words: Iterable[str]):
        self.itos = [PAD, UNK, *sorted(set(words) - {PAD, UNK})]
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    @classmethod
    def build(cls, texts: Iterable[str], min_count: int = 1) -> Vocab:
        counts = Counter(w for t in texts for w in tokenize(t))
        return cls(w for w, c in counts.items() if c >= min_count)

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str, max_words: int) -> tuple[np.ndarray, int]:
        """Ids padded / truncated to ``max_words`` and the true length (>= 1)."""
        ids = [self.stoi.get(w, 1) for w in tokenize(text)][:max_words] or [1]
        out = np.zeros(max_words, dtype=np.int64)
        out[: len(ids)] = ids
        return out, len(ids)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"itos": self.itos}, indent=0))

    @classmethod
    def load(cls, path: str | Path) -> Vocab:
        itos = json.loads(Path(path).read_text())["itos"]
        vocab = cls(itos[2:])
        if vocab.itos != itos:
            raise ValueError(f"{path}: vocabulary is not in canonical order")
        return vocab


def erasure_mask(
    texts: list[str], max_words: int, nouns: frozenset[str], rng: np.random.Generator
) -> np.ndarray:
    """DMMI's training-time erasure (Section 3.1): one entity word per query, at random.

    Positions are the tokenizer's own (:func:`tokenize`, truncated to ``max_words`` exactly as
    :meth:`Vocab.encode` does), so position ``i`` is token ``i`` of the encoded query. Every
    occurrence of the chosen word is erased, so it is really absent from the masked query. A
    query with no word of ``nouns`` erases nothing (one draw from ``rng`` per query that has).

    Returns:
        (len(texts), max_words) bool, True at the erased positions.
    """
    out = np.zeros((len(texts), max_words), dtype=bool)
    for row, text in enumerate(texts):
        words = tokenize(text)[:max_words]
        found = [i for i, w in enumerate(words) if w in nouns]
        if found:
            chosen = words[found[int(rng.integers(len(found)))]]
            out[row, : len(words)] = [w == chosen for w in words]
    return out
