"""Query side of the base network (SDA Appendix A): word embeddings W and a Bi-GRU giving Q, or
a BERT-family encoder read offline that reads the whole query in context (DMMI's text side)."""

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


def _load_local_encoder(path: str | Path, dim: int):
    """``(tokenizer, encoder)`` of a local Hugging Face model folder, offline, checked."""
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
    return tokenizer, encoder


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
    tokenizer, encoder = _load_local_encoder(path, dim)
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


#: word pieces kept per vocabulary word by the contextual encoder (longer words are cut)
SUBTOKENS = 8


def contextual_subtokens(path: str | Path, vocab: Vocab, dim: int) -> torch.Tensor:
    """The contextual encoder's view of the vocabulary: (len(vocab) + 1, SUBTOKENS) int64,
    row i the encoder's own sub-word ids of word i (-1 padded; ``<pad>`` none, ``<unk>`` the
    tokeniser's mask token, read as "some word here"), and a last row holding the ids of its
    ``[CLS]``, ``[SEP]`` and pad tokens.

    Raises:
        ParamsError: as :func:`load_transformer_embeddings`.
    """
    tokenizer, _ = _load_local_encoder(path, dim)
    table = torch.full((len(vocab) + 1, SUBTOKENS), -1, dtype=torch.long)
    unknown = tokenizer.mask_token_id
    table[1, 0] = unknown if unknown is not None else tokenizer.unk_token_id
    for i, word in enumerate(vocab.itos[2:], start=2):
        ids = tokenizer(word, add_special_tokens=False)["input_ids"][:SUBTOKENS]
        table[i, : len(ids)] = torch.tensor(ids or [tokenizer.unk_token_id])
    cls = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    sep = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    table[-1, :3] = torch.tensor([cls, sep, tokenizer.pad_token_id or 0])
    return table


class ContextualQueryEncoder(nn.Module):
    """Token ids -> (W, Q) through a BERT-family encoder that reads the whole query
    (``model.text_encoder: contextual``, DMMI's text side), fine-tuned with the network.

    Our ids are mapped to the encoder's sub-word ids (:func:`contextual_subtokens`, a buffer
    saved with the weights), the query is read as ``[CLS] pieces [SEP]``, and each word's
    pieces are averaged back into one vector per word: W from the encoder's input embeddings
    (E = its hidden size = ``model.embed_dim``), Q from its last hidden states projected to
    ``model.hidden``. Shapes match :class:`QueryEncoder`'s, so every head and CSM read it
    unchanged. The weights come from ``model.text_model_path`` when ``subtokens`` is given (a
    network trained from scratch); otherwise only its config is read and the weights come from
    a trained state dict.
    """

    def __init__(self, vocab_size: int, path: str, hidden: int, subtokens=None):
        super().__init__()
        from transformers import AutoConfig, AutoModel

        if subtokens is not None:
            self.encoder = AutoModel.from_pretrained(path, local_files_only=True)
        else:
            config = AutoConfig.from_pretrained(path, local_files_only=True)
            self.encoder = AutoModel.from_config(config)
        # fp32 whatever the checkpoint's dtype (autocast handles mixed precision), and no
        # pooler: its output reaches no loss, and DDP refuses parameters without gradients
        self.encoder = self.encoder.float()
        if getattr(self.encoder, "pooler", None) is not None:
            self.encoder.pooler = None
        table = torch.full((vocab_size + 1, SUBTOKENS), -1, dtype=torch.long)
        self.register_buffer("subtokens", table if subtokens is None else subtokens.clone())
        self.proj = nn.Linear(self.encoder.config.hidden_size, hidden)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor):
        b, n = tokens.shape
        cls, sep, pad = self.subtokens[-1, :3].tolist()
        pieces = self.subtokens[tokens]  # (B, N, K), -1 = none
        pieces = pieces.masked_fill(
            (
                torch.arange(n, device=tokens.device) >= lengths.to(tokens.device).view(-1, 1)
            ).unsqueeze(-1),
            -1,
        )  # nothing past a query's length
        flat = pieces.flatten(1)  # (B, N*K)
        valid = flat >= 0
        # pieces beyond the encoder's positions (less [CLS] and [SEP]) are cut
        valid &= valid.cumsum(1) <= self.encoder.config.max_position_embeddings - 2
        count = valid.sum(1)  # (B,)
        pos = valid.cumsum(1)  # 1-based slot after [CLS]
        t = int(count.max()) + 2
        ids = torch.full((b, t), pad, dtype=torch.long, device=tokens.device)
        ids[:, 0] = cls
        bi, ji = valid.nonzero(as_tuple=True)
        ids[bi, pos[bi, ji]] = flat[bi, ji]
        ids[torch.arange(b, device=tokens.device), count + 1] = sep
        attention = (torch.arange(t, device=tokens.device) < (count + 2).view(-1, 1)).long()
        states = self.encoder(input_ids=ids, attention_mask=attention).last_hidden_state
        inputs = self.encoder.get_input_embeddings()(ids)  # (B, T, E)
        assign = torch.zeros(b, n, t, device=tokens.device, dtype=states.dtype)
        assign[bi, ji // SUBTOKENS, pos[bi, ji]] = 1.0
        assign = assign / assign.sum(-1, keepdim=True).clamp_min(1.0)  # mean over a word's pieces
        words = assign @ inputs.to(states.dtype)  # (B, N, E)
        return words, self.proj(assign @ states)  # (B, N, E), (B, N, C)


def build_query_encoder(cfg, vocab_size: int, embeddings: torch.Tensor | None = None):
    """``model.text_encoder``: the Bi-GRU over word embeddings W (``embeddings`` their initial
    table), or the contextual encoder (``embeddings`` its sub-word table)."""
    if cfg.text_encoder == "contextual":
        return ContextualQueryEncoder(vocab_size, cfg.text_model_path, cfg.hidden, embeddings)
    return QueryEncoder(vocab_size, cfg.embed_dim, cfg.hidden, embeddings)
