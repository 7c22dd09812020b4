"""The base query-based segmentation network of SDA (Section 3.1, Appendix A).

Encoder (visual CNN + word embeddings W + Bi-GRU Q) -> interaction (Eqs. 8, 9) at N_m
resolutions -> FCN decoder giving multi-scale response maps (Eq. 10). Inference (Section 3.4):
foreground = response above half of its maximum; we add one rule for one-to-zero queries: if
the maximum itself is below ``empty_threshold`` the mask is empty (DMMI's zero-target case).
"""

from __future__ import annotations

import torch
from torch import nn

from components.config import ModelConfig
from components.models.decoder import MultiScaleDecoder, referring_outputs
from components.models.dmmi import DMMINet
from components.models.interaction import Interaction
from components.models.text import build_query_encoder
from components.models.visual import build_visual


class QuerySegNet(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int, embeddings: torch.Tensor | None = None):
        super().__init__()
        self.visual = build_visual(cfg)
        self.scales = cfg.scales
        self.clip_pooling = cfg.clip_pooling
        self.query = build_query_encoder(cfg, vocab_size, embeddings)
        chans = self.visual.out_channels[-cfg.scales :]
        self.interactions = nn.ModuleList(
            Interaction(c, cfg.hidden, cfg.num_superpixels) for c in chans
        )
        self.decoder = MultiScaleDecoder(cfg.hidden, cfg.scales)

    def forward(self, image, tokens, lengths, superpixels, clip=None) -> dict:
        """
        Args:
            image: (B, 3, H, W); tokens: (B, N); lengths: (B,); superpixels: (B, H, W);
            clip: (B, T, 3, H, W) the frames around a video sample's annotated frame, or None.
        Returns:
            logits: finest-first list of (B, 1, H_i, W_i) response logits;
            response: (B, H, W) sigmoid response map at image resolution;
            words: (B, N, E) word embeddings W; query: (B, N, C) encoded Q;
            word_mask: (B, N); alphas: finest-first list of (B, H_i*W_i, N);
            alpha: the deepest level's attention; features: (B, C_last, h, w) last encoder layer;
            enhanced: finest-first interaction outputs F_i (B, C, H_i, W_i), the input of any
            decoder (SDA's auxiliary decoder reads them); fused: the main decoder's inputs
            after its top-down path.
        """
        return self.decode(self.encode_image(image, clip), tokens, lengths, superpixels)

    def encode_image(self, image, clip=None) -> list[torch.Tensor]:
        """The visual side alone: the last ``scales`` encoder levels, finest first (a caller
        that asks several queries of one image encodes it once)."""
        feats = self.visual(image)[-self.scales :]
        if clip is not None and self.clip_pooling == "mean":
            feats = clip_pooled(self.visual, feats, clip, self.scales)
        return feats

    def decode(self, feats: list, tokens, lengths, superpixels) -> dict:
        """:meth:`forward` from :meth:`encode_image`'s features on."""
        image_size = superpixels.shape[-2:]
        words, q = self.query(tokens, lengths)
        word_mask = tokens != 0
        word_mask[:, 0] = True  # a query is never empty after tokenisation
        fs, alphas = [], []
        for block, v in zip(self.interactions, feats, strict=True):
            f, a = block(v, q, word_mask, superpixels)
            fs.append(f)
            alphas.append(a)
        return referring_outputs(
            self.decoder,
            fs,
            image_size,
            words=words,
            query=q,
            word_mask=word_mask,
            alphas=alphas,
            features=feats[-1],
        )


def clip_pooled(visual: nn.Module, feats: list, clip: torch.Tensor, scales: int) -> list:
    """Frame-wise encoding and temporal mean pooling (``model.clip_pooling: mean``): each level's
    features averaged over the annotated frame (``feats``, from the batch's image, so whatever
    a method did to it counts) and the ``T`` frames of its clip (``clip``, (B, T, 3, H, W),
    the annotated frame among them: it weighs twice, as the centre of its clip)."""
    b, t = clip.shape[:2]
    frames = visual(clip.flatten(0, 1))[-scales:]  # per level (B*T, C, h, w)
    pooled = []
    for f, g in zip(feats, frames, strict=True):
        pooled.append((f + g.view(b, t, *g.shape[1:]).sum(1)) / (t + 1))
    return pooled


#: the referring task's base networks, by ``model.arch``
ARCHS: dict[str, type[nn.Module]] = {"sda": QuerySegNet, "dmmi": DMMINet}


def build_model(cfg: ModelConfig, vocab_size: int, embeddings=None) -> nn.Module:
    """The base network of ``cfg.arch`` (``load_trained`` rebuilds it from ``model.json``)."""
    return ARCHS[cfg.arch](cfg, vocab_size, embeddings)


@torch.no_grad()
def predict_masks(response: torch.Tensor, empty_threshold: float):
    """Response maps (B, H, W) in [0, 1] -> boolean masks (B, H, W) and scores (B,).

    Score = the map's maximum; foreground = response > score / 2 (Section 3.4), and nothing
    when score < ``empty_threshold``.
    """
    score = response.flatten(1).amax(1)  # (B,)
    masks = response > (score / 2).view(-1, 1, 1)
    masks &= (score >= empty_threshold).view(-1, 1, 1)
    return masks, score


def save_trained(
    folder, model: nn.Module, cfg: ModelConfig, vocab_size: int, meta: dict, task=None
) -> None:
    """Write ``model.pt`` (a plain state_dict) and ``model.json`` (how to rebuild it: the model
    params, the vocabulary size and the task with its class names)."""
    import json
    from pathlib import Path

    folder = Path(folder)
    state = {k: v.detach().cpu() for k, v in _unwrap(model).state_dict().items()}
    torch.save(state, folder / "model.pt")
    info = {"model": cfg.model_dump(mode="json"), "vocab_size": vocab_size, **meta}
    if task is not None:
        info["task"] = task.name
        info["class_names"] = list(task.class_names)
    (folder / "model.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


def load_trained(folder, map_location="cpu") -> tuple[nn.Module, dict]:
    """Rebuild a model written by :func:`save_trained` (tensors only: ``weights_only=True``).

    ``info["task_obj"]`` is the :class:`~components.tasks.Task` the model was trained for.
    """
    import json
    from pathlib import Path

    from components.tasks import make_task

    folder = Path(folder)
    info = json.loads((folder / "model.json").read_text())
    mcfg = ModelConfig.model_validate(info["model"])
    task = make_task(info.get("task", "referring"), mcfg, info.get("class_names"))
    info["task_obj"] = task
    model = task.build_network(info["vocab_size"])
    state = torch.load(folder / "model.pt", map_location=map_location, weights_only=True)
    model.load_state_dict(state)
    return model, info


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model  # DDP wrapper
