"""Visual encoders with multi-resolution outputs (SDA Appendix A: the last N_m layers)."""

from __future__ import annotations

import torch
from torch import nn

from components.models.resnet import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ResNet,
    find_weights,
    load_imagenet,
)


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
    """A ResNet body (``components.models.resnet``, torchvision's keys) giving layer1..layer4,
    with ImageNet weights unless ``pretrained`` is false."""

    def __init__(self, name: str, pretrained: bool = True):
        super().__init__()
        self.net = ResNet(name, frozen_bn=pretrained)
        if pretrained:  # the weights come with load_backbone (a fresh network only)
            mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        else:
            mean, std = torch.full((3,), 0.5), torch.full((3,), 0.25)
        # the pipeline feeds (x - 0.5) / 0.25; ImageNet weights expect (x - mean) / std
        self.register_buffer("scale", (0.25 / std)[None, :, None, None], persistent=False)
        self.register_buffer("shift", ((0.5 - mean) / std)[None, :, None, None], persistent=False)
        self.out_channels = list(self.net.out_channels)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for block in self.blocks():
            x = block(x)
            feats.append(x)
        return feats

    def layers(self) -> list[nn.Module]:
        return [self.net.layer1, self.net.layer2, self.net.layer3, self.net.layer4]

    def blocks(self) -> list:
        """The stages in order as callables (normalisation and stem run with layer1), as
        ``ConvEncoder.blocks``."""
        return [self._first_stage, *self.layers()[1:]]

    def _first_stage(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.layer1(self.net.stem(x * self.scale + self.shift))


def build_visual(cfg) -> nn.Module:
    """The visual encoder of ``model.backbone`` (a ``ModelConfig``), without pretrained
    weights: a trained network is rebuilt and then loaded whole, so only the phase that starts
    from scratch reads the ImageNet file (:func:`imagenet_state`, :func:`load_backbone`)."""
    if cfg.backbone == "convnet":
        return ConvEncoder(cfg.widths)
    return ResNetEncoder(cfg.backbone, cfg.backbone_pretrained)


def imagenet_state(cfg) -> dict[str, torch.Tensor] | None:
    """The checked ImageNet weights of ``cfg.backbone`` (``ResNet`` keys), or None for the
    convnet or ``backbone_pretrained: false``.

    Raises:
        ParamsError: no weight file, or one of another network (naming the field).
    """
    if cfg.backbone == "convnet" or not cfg.backbone_pretrained:
        return None
    net = ResNet(cfg.backbone, frozen_bn=True)
    load_imagenet(net, find_weights(cfg.backbone, cfg.backbone_weights))
    return net.state_dict()


def load_backbone(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put :func:`imagenet_state`'s weights into a fresh network's ResNet backbone."""
    visual = getattr(model, "visual", None)
    if not isinstance(visual, ResNetEncoder):
        raise ValueError("backbone weights given for a network without a ResNet backbone")
    visual.net.load_state_dict(state)
