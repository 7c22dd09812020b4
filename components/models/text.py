"""Query side of the base network (SDA Appendix A): word embeddings W and a Bi-GRU giving Q."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from components.config import ParamsError
from components.data.vocab import Vocab, tokenize


def load_glove(path: str | Path, vocab: Vocab, dim: int, seed: int = 0) -> torch.Tensor:
    """Embedding matrix (len(vocab), dim) from a GloVe text file (``word v1 ... v_dim`` lines).

    Words absent from the file keep a small seeded random vector; ``<pad>`` is all zeros.

    Raises:
        ValueError: naming the file and line of a row whose width is not ``dim``.
    """
    rng = np.random.default_rng(seed)
    table = rng.normal(0.0, 0.1, size=(len(vocab), dim)).astype(np.float32)
    table[0] = 0.0
    found = 0
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            parts = line.rstrip().split(" ")
            word = parts[0]
            if word not in vocab.stoi:
                continue
            if len(parts) - 1 != dim:
                raise ValueError(f"{path}:{lineno}: expected {dim} values, got {len(parts) - 1}")
            table[vocab.stoi[word]] = np.asarray(parts[1:], dtype=np.float32)
            found += 1
    if found == 0:
        raise ValueError(f"{path}: no word of the vocabulary was found")
    return torch.from_numpy(table)


def fit_cooccurrence(
    texts: Iterable[str], vocab: Vocab, dim: int, window: int = 2, seed: int = 0
) -> torch.Tensor:
    """Embedding matrix (len(vocab), dim) fitted without labels on query text: positive
    pointwise mutual information of words within ``window`` of each other, reduced to ``dim``
    by truncated SVD (scikit-learn), scaled to unit variance (``nn.Embedding``'s init).

    Fed the training queries of both domains (the unlabeled target queries are data an
    adaptation method may read), a word that only target queries use gets a vector from the
    words around it instead of a random one. ``<pad>`` is zero; ``<unk>`` is the mean word.
    """
    from sklearn.decomposition import TruncatedSVD

    n = len(vocab)
    counts = np.zeros((n, n), dtype=np.float64)
    for text in texts:
        ids = [vocab.stoi.get(w, 1) for w in tokenize(text)]
        for i, a in enumerate(ids):
            for b in ids[max(0, i - window) : i]:
                counts[a, b] += 1.0
                counts[b, a] += 1.0
    counts[:2] = counts[:, :2] = 0.0  # no vector from <pad> / <unk> contexts
    total = counts.sum()
    if total == 0:
        raise ValueError("no two words of the vocabulary co-occur in the given texts")
    row = counts.sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        pmi = np.log(counts * total / (row * row.T))
    ppmi = np.where(counts > 0, np.maximum(pmi, 0.0), 0.0)
    k = max(1, min(dim, n - 3))  # the SVD of an (n - 2)-row matrix has fewer components
    vecs = TruncatedSVD(n_components=k, random_state=seed).fit_transform(ppmi[2:])
    table = np.zeros((n, dim), dtype=np.float32)
    table[2:, : vecs.shape[1]] = vecs / max(vecs.std(), 1e-8)
    table[1] = table[2:].mean(0)
    return torch.from_numpy(table)


def load_transformer_embeddings(
    path: str | Path, vocab: Vocab, dim: int, batch_size: int = 256
) -> torch.Tensor:
    """Embedding matrix (len(vocab), dim) from a BERT-family encoder in a local directory
    (Hugging Face layout: ``config.json``, weights, tokenizer files), read offline.

    Each vocabulary word is encoded alone (``[CLS] word [SEP]``) and the last hidden states of
    its sub-word tokens are averaged: a static vector per word, so the rest of the network
    (Bi-GRU, CSM's content vectors) is unchanged and words seen only in target queries get a
    meaningful vector instead of a random one. ``<pad>`` is zero; ``<unk>`` is the mean word.

    Raises:
        ParamsError: naming the field: the directory is missing or not a model, or the
            encoder's hidden size is not ``model.embed_dim``.
    """
    from transformers import AutoModel, AutoTokenizer

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ParamsError(f"model.text_model_path: {folder} holds no config.json (a local model)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        encoder = AutoModel.from_pretrained(folder, local_files_only=True).eval()
    except (OSError, ValueError) as err:  # no tokenizer / weights files, an unknown model type
        raise ParamsError(
            f"model.text_model_path: {folder}: not a loadable model ({err})"
        ) from None
    hidden = encoder.config.hidden_size
    if hidden != dim:
        raise ParamsError(
            f"model.embed_dim: {dim}, but the encoder in {folder} has hidden size {hidden}"
        )
    words = vocab.itos[2:]
    table = torch.zeros(len(vocab), dim)
    with torch.no_grad():
        for start in range(0, len(words), batch_size):
            chunk = words[start : start + batch_size]
            enc = tokenizer(
                chunk, padding=True, return_tensors="pt", return_special_tokens_mask=True
            )
            special = enc.pop("special_tokens_mask")
            states = encoder(**enc).last_hidden_state  # (B, T, dim)
            keep = (enc["attention_mask"] * (1 - special)).unsqueeze(-1).float()  # (B, T, 1)
            vecs = (states * keep).sum(1) / keep.sum(1).clamp_min(1.0)
            table[2 + start : 2 + start + len(chunk)] = vecs
    if words:
        table[1] = table[2:].mean(0)  # <unk>
    return table


class QueryEncoder(nn.Module):
    """Token ids -> (W, Q): word embeddings (B, N, E) and Bi-GRU query features (B, N, C)."""

    def __init__(
        self, vocab_size: int, embed_dim: int, hidden: int, pretrained: torch.Tensor | None = None
    ):
        super().__init__()
        if hidden % 2:
            raise ValueError(f"hidden size must be even for a Bi-GRU, got {hidden}")
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        if pretrained is not None:
            self.embed.weight.data.copy_(pretrained)
        self.gru = nn.GRU(embed_dim, hidden // 2, batch_first=True, bidirectional=True)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor):
        words = self.embed(tokens)  # (B, N, E)
        packed = pack_padded_sequence(words, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.gru(packed)
        q, _ = pad_packed_sequence(out, batch_first=True, total_length=tokens.shape[1])
        return words, q  # (B, N, E), (B, N, C)
