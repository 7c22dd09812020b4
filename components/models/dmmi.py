"""DMMI, the second base network of the referring task (Hu et al., "Beyond One-to-One:
Rethinking the Referring Image Segmentation", ICCV 2023), selected by ``model.arch: dmmi``.

Encoder (Section 3.1.1): the visual encoder's stages alternate with MBA blocks
(:mod:`components.models.mba`) at each of the last ``scales`` stages; each refined V* goes on to
the next stage and each refined E* to the next MBA. The words are SDA's embeddings W and Bi-GRU.

Text-to-image decoder (Section 3.2): SDA's :class:`MultiScaleDecoder` on the MBA outputs
projected to ``hidden`` channels. Its top-down path adds every coarser level to the finer one
(the skip connections of Eq. 7) and it keeps one head per level, so Eq. 10's multi-scale loss and
the seams that call ``network.decoder(levels)`` on visual levels alone (CDANet, SDA's auxiliary
decoder) work unchanged. Eq. 7's Transformer layer psi (pixels attending to E*) is left out for
that reason: the text already enters every level through MBA.

Image-to-text decoder (Section 3.3), only when ``forward`` is given erased positions (training):
the query with its entity word replaced by ``<unk>`` is encoded again (E'), the Context Clue
Recovery decoder (masked text queries attending to the deepest visual level) reconstructs E_hat,
and the network returns per-sample terms of L_sim (Eq. 8) and L_con (Eqs. 9-11);
:func:`auxiliary_loss` applies the one-to-zero indicator delta and the weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from components.config import DMMIConfig, ModelConfig
from components.models.decoder import MultiScaleDecoder, referring_outputs
from components.models.mba import MBA
from components.models.text import build_query_encoder
from components.models.visual import build_visual

MASK_TOKEN = 1  # <unk>: an erased word is a word the encoder cannot read


class ContextClueRecovery(nn.Module):
    """CCR (Section 3.3.1): Transformer decoder layers, E' as queries, visual pixels as memory."""

    def __init__(self, hidden: int, layers: int, heads: int):
        super().__init__()
        layer = nn.TransformerDecoderLayer(hidden, heads, 2 * hidden, dropout=0.0, batch_first=True)
        self.decoder = nn.TransformerDecoder(layer, layers)

    def forward(self, e_masked, word_mask, visual):
        """e_masked: (B, L, C); word_mask: (B, L); visual: (B, P, C) -> E_hat (B, L, C)."""
        return self.decoder(e_masked, visual, tgt_key_padding_mask=~word_mask)


def similarity_terms(recon, target, word_mask) -> torch.Tensor:
    """Eq. 8 per sample, before delta: ``1 - cos(Detach(E*), E_hat)`` over the whole sentence
    (the real words' features flattened into one vector: a global similarity; assumed).

    Args:
        recon: (B, L, C) E_hat; target: (B, L, C) E*; word_mask: (B, L).
    Returns:
        (B,).
    """
    m = word_mask.unsqueeze(-1).to(recon.dtype)
    return 1.0 - F.cosine_similarity((recon * m).flatten(1), (target.detach() * m).flatten(1))


def contrastive_terms(v_o, e_o, temperature: float) -> torch.Tensor:
    """Eqs. 9-11 per sample, before delta: image-to-text plus text-to-image InfoNCE over the
    batch on L2-normalised pooled features (dot / temperature, the release's logit scale).

    Args:
        v_o: (B, C) pooled visual features; e_o: (B, C) pooled sentence features.
    Returns:
        (B,) ``-log p(E_i | V_i) - log p(V_i | E_i)``.
    """
    logits = F.normalize(v_o, dim=-1) @ F.normalize(e_o, dim=-1).T / temperature  # (B, B)
    target = torch.arange(len(logits), device=logits.device)
    i2t = F.cross_entropy(logits, target, reduction="none")  # Eq. 10
    t2i = F.cross_entropy(logits.T, target, reduction="none")  # Eq. 11
    return i2t + t2i


def auxiliary_loss(out: dict, has_target: torch.Tensor, cfg: DMMIConfig) -> torch.Tensor:
    """``sim_weight * L_sim + con_weight * L_con``, batch means of the per-sample terms.

    delta (``has_target``, (B,) bool: the ground-truth mask is not empty) switches both off for
    one-to-zero samples; L_sim is also off for a query in which nothing was erased (it has no
    entity noun), as there is nothing to recover.
    """
    delta = has_target.to(out["sim_terms"].dtype)
    erased = out["erased"].any(1).to(delta.dtype)
    l_sim = (delta * erased * out["sim_terms"]).mean()
    l_con = (delta * out["con_terms"]).mean()
    return cfg.sim_weight * l_sim + cfg.con_weight * l_con


class DMMINet(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int, embeddings: torch.Tensor | None = None):
        super().__init__()
        self.visual = build_visual(cfg)
        self.scales = cfg.scales
        self.query = build_query_encoder(cfg, vocab_size, embeddings)
        chans = self.visual.out_channels[-cfg.scales :]
        d = cfg.dmmi
        self.mba = nn.ModuleList(MBA(c, cfg.hidden, d.windows, d.spans) for c in chans)
        self.project = nn.ModuleList(nn.Conv2d(c, cfg.hidden, 1) for c in chans)
        self.decoder = MultiScaleDecoder(cfg.hidden, cfg.scales)
        self.ccr = ContextClueRecovery(cfg.hidden, d.ccr_layers, d.ccr_heads)
        self.temperature = d.temperature

    def forward(self, image, tokens, lengths, superpixels, erase=None) -> dict:
        """
        Args:
            image: (B, 3, H, W); tokens: (B, N); lengths: (B,); superpixels: unused (the
            signature of every referring network); erase: (B, N) bool erased word positions,
            training only.
        Returns:
            The keys of :class:`~components.models.network.QuerySegNet` with the same shapes
            (``query`` is the refined E* of the last MBA, ``alphas`` the mixed W_att^alpha,
            ``features`` the last encoder stage after its MBA, ``enhanced`` the decoder inputs);
            with ``erase`` also ``erased`` (B, N), ``sim_terms`` and ``con_terms`` (B,).

        Raises:
            ValueError: ``erase`` given in eval mode (evaluation never erases).
        """
        if erase is not None and not self.training:
            raise ValueError("erased words are a training-only input (the network is in eval)")
        words, e = self.query(tokens, lengths)
        word_mask = tokens != 0
        word_mask[:, 0] = True  # a query is never empty after tokenisation
        blocks = self.visual.blocks()
        first = len(blocks) - self.scales
        x, feats, alphas = image, [], []
        for i, block in enumerate(blocks):
            x = block(x)
            if i >= first:
                x, e, a = self.mba[i - first](x, e, word_mask)  # (B, C_i, H_i, W_i), (B, N, C)
                feats.append(x)
                alphas.append(a)
        fs = [p(v) for p, v in zip(self.project, feats, strict=True)]  # (B, C, H_i, W_i)
        out = referring_outputs(
            self.decoder,
            fs,
            image.shape[-2:],
            words=words,
            query=e,
            word_mask=word_mask,
            alphas=alphas,
            features=feats[-1],
        )
        if erase is not None:
            out.update(self._image_to_text(tokens, lengths, erase, word_mask, e, fs[-1]))
        return out

    def _image_to_text(self, tokens, lengths, erase, word_mask, e_full, visual) -> dict:
        """CCR and the per-sample terms of Eqs. 8-11 (visual: (B, C, h, w) deepest level)."""
        _, e_masked = self.query(tokens.masked_fill(erase, MASK_TOKEN), lengths)  # E'
        pixels = visual.flatten(2).transpose(1, 2)  # (B, P, C)
        recon = self.ccr(e_masked, word_mask, pixels)  # (B, N, C) E_hat
        m = word_mask.unsqueeze(-1).to(e_full.dtype)
        e_o = (e_full * m).sum(1) / m.sum(1)  # (B, C)
        return {
            "erased": erase,
            "sim_terms": similarity_terms(recon, e_full, word_mask),
            "con_terms": contrastive_terms(pixels.mean(1), e_o, self.temperature),
        }
