"""Visual encoders with multi-resolution outputs (SDA Appendix A: the last N_m layers)."""

from __future__ import annotations

import importlib.util

import torch
from torch import nn


def _norm(c: int) -> nn.GroupNorm:
    # GroupNorm, not BatchNorm: batch statistics would mix domains and vary with worker count.
    return nn.GroupNorm(max(1, min(8, c // 4)), c)


class ConvBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
            _norm(cout),
            nn.ReLU(),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
            _norm(cout),
        )
        self.skip = (
            nn.Identity()
            if cin == cout and stride == 1
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), _norm(cout))
        )

    def forward(self, x):
        return torch.relu(self.body(x) + self.skip(x))


class ConvEncoder(nn.Module):
    """Small residual CNN for CPU: stage i has ``widths[i]`` channels.

    The first stage downsamples by 2 and the second keeps its resolution, later ones halve it:
    strides 2, 2, 4, 8, ... so a 64 px image gives 32, 32, 16, 8 px maps; the finest response
    is at half resolution, cheap enough for two CPU cores.
    """

    def __init__(self, widths: list[int]):
        super().__init__()
        chans = [3, *widths]
        self.stages = nn.ModuleList(
            ConvBlock(chans[i], chans[i + 1], 1 if i == 1 else 2) for i in range(len(widths))
        )
        self.out_channels = list(widths)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats  # finest first

    def blocks(self) -> list[nn.Module]:
        """The stages in order, for networks that act between them (DMMI's MBA)."""
        return list(self.stages)


class ResNetEncoder(nn.Module):
    """torchvision ResNet (layer1..layer4), when torchvision is installed."""

    def __init__(self, name: str, weights_path: str | None = None):
        super().__init__()
        if importlib.util.find_spec("torchvision") is None:
            raise ImportError(
                f"model.backbone={name!r} needs torchvision; install it or use 'convnet'"
            )
        from torchvision import models

        net = getattr(models, name)(weights=None)
        if weights_path:
            net.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layers = nn.ModuleList([net.layer1, net.layer2, net.layer3, net.layer4])
        with torch.no_grad():
            self.out_channels = [f.shape[1] for f in self.forward(torch.zeros(1, 3, 64, 64))]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        feats = []
        for layer in self.layers:
            x = layer(x)
            feats.append(x)
        return feats

    def blocks(self) -> list[nn.Module]:
        """The stages in order (the stem runs with layer1), as ``ConvEncoder.blocks``."""
        return [nn.Sequential(self.stem, self.layers[0]), *self.layers[1:]]


def build_visual(cfg) -> nn.Module:
    """The visual encoder of ``model.backbone`` (a ``ModelConfig``)."""
    if cfg.backbone == "convnet":
        return ConvEncoder(cfg.widths)
    return ResNetEncoder(cfg.backbone, cfg.backbone_weights)
