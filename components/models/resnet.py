"""ResNet-18/34/50/101 (He et al., 2016) whose parameter names are torchvision's, so the ImageNet
weights users already hold (torchvision's ``resnet50-0676ba61.pth``, timm's ResNet checkpoints,
any file with the same keys) load without torchvision installed, offline.

Where the weights come from, in order: ``model.backbone_weights`` (a ``.pth`` / ``.pt`` state
dict read with ``weights_only=True``, or a ``.safetensors`` file when that package is
installed); else torch's hub cache (``$TORCH_HOME/hub/checkpoints``), where torchvision and
timm keep what they downloaded. No weights found is an error that says how to provide them,
never a silent random init; ``model.backbone_pretrained: false`` asks for a random init on
purpose (then GroupNorm replaces the batch norms, which would have no statistics to freeze).

With ImageNet weights the batch norms are frozen (their statistics and affine parameters are
buffers), as segmentation fine-tuning at small batch sizes does, and the input is re-normalised
from the pipeline's ``(x - 0.5) / 0.25`` to ImageNet's mean and standard deviation.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from components.config import ParamsError

#: (block, blocks per layer) of each depth (He et al., 2016, Table 1)
DEPTHS = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
}
#: torchvision's ImageNet weight files of each depth (V1 first), as its hub cache names them
TORCHVISION_FILES = {
    "resnet18": ("resnet18-f37072fd.pth",),
    "resnet34": ("resnet34-b627a593.pth",),
    "resnet50": ("resnet50-0676ba61.pth", "resnet50-11ad3fa6.pth"),
    "resnet101": ("resnet101-63fe2227.pth", "resnet101-cd907fc2.pth"),
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class FrozenBatchNorm2d(nn.Module):
    """Batch norm with fixed statistics and affine parameters (buffers under BatchNorm2d's
    names, so a torchvision state dict loads into it)."""

    def __init__(self, c: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        for name, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0)):
            self.register_buffer(name, torch.full((c,), value))
        self.register_buffer("running_var", torch.ones(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale[None, :, None, None] + shift[None, :, None, None]


def _norm(c: int, frozen: bool) -> nn.Module:
    return FrozenBatchNorm2d(c) if frozen else nn.GroupNorm(max(1, min(32, c // 8)), c)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int, frozen: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = _norm(planes, frozen)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = _norm(planes, frozen)
        self.downsample = _downsample(cin, planes, stride, frozen)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (self.downsample(x) if self.downsample is not None else x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, frozen: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = _norm(planes, frozen)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)  # stride on the 3x3
        self.bn2 = _norm(planes, frozen)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = _norm(planes * 4, frozen)
        self.downsample = _downsample(cin, planes * 4, stride, frozen)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return torch.relu(y + (self.downsample(x) if self.downsample is not None else x))


def _downsample(cin: int, cout: int, stride: int, frozen: bool) -> nn.Module | None:
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), _norm(cout, frozen))


class ResNet(nn.Module):
    """The torchvision ResNet body without its classifier: stem, then layer1..layer4."""

    def __init__(self, name: str, frozen_bn: bool):
        super().__init__()
        kind, counts = DEPTHS[name]
        block = BasicBlock if kind == "basic" else Bottleneck
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = _norm(64, frozen_bn)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin, layers = 64, []
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), counts, strict=True)):
            blocks = []
            for j in range(n):
                blocks.append(block(cin, planes, 2 if i > 0 and j == 0 else 1, frozen_bn))
                cin = planes * block.expansion
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.out_channels = [p * block.expansion for p in (64, 128, 256, 512)]

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(torch.relu(self.bn1(self.conv1(x))))


def find_weights(name: str, path: str | None) -> Path:
    """The ImageNet weight file of ``name``: ``path``, else torch's hub cache.

    Raises:
        ParamsError: saying where it looked and how to provide the file.
    """
    if path:
        if not Path(path).is_file():
            raise ParamsError(f"model.backbone_weights: {path} is not a file")
        return Path(path)
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    for file in TORCHVISION_FILES[name]:
        if (cache / file).is_file():
            return cache / file
    raise ParamsError(
        f"model.backbone {name} needs ImageNet weights and none were found: set "
        f"model.backbone_weights to a state dict with torchvision's keys (e.g. "
        f"{TORCHVISION_FILES[name][0]} from download.pytorch.org/models, or a timm ResNet "
        f"checkpoint), or place that file in {cache}; model.backbone_pretrained: false trains "
        "from a random init on purpose"
    )


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.pth`` / ``.pt`` (``weights_only``) or ``.safetensors``; a wrapping
    ``{"state_dict": ...}`` / ``{"model": ...}`` and a ``module.`` prefix are unwrapped."""
    if path.suffix == ".safetensors":
        if importlib.util.find_spec("safetensors") is None:
            raise ParamsError(
                f"model.backbone_weights: {path}: reading .safetensors needs the safetensors "
                "package (pip install safetensors)"
            )
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise ParamsError(f"model.backbone_weights: {path}: unreadable ({err})") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 -- anything unreadable is a bad weights file
            raise ParamsError(
                f"model.backbone_weights: {path}: not a readable weights file ({err})"
            ) from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ParamsError(f"model.backbone_weights: {path}: not a state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_imagenet(net: ResNet, path: Path) -> None:
    """Load ``path`` into ``net``: every key of the body must be there with its shape; the
    classifier (``fc.*``) and ``num_batches_tracked`` are ignored.

    Raises:
        ParamsError: naming the file and the first missing, surplus or mis-shaped keys.
    """
    state = {
        k: v
        for k, v in read_state_dict(path).items()
        if not k.startswith("fc.") and not k.endswith("num_batches_tracked")
    }
    own = net.state_dict()
    missing = sorted(own.keys() - state.keys())
    surplus = sorted(state.keys() - own.keys())
    shaped = [k for k in own.keys() & state.keys() if own[k].shape != state[k].shape]
    if missing or surplus or shaped:
        raise ParamsError(
            f"model.backbone_weights: {path} holds no weights of this ResNet depth: missing "
            f"{missing[:3]}, unexpected {surplus[:3]}, other shape {shaped[:3]}"
        )
    net.load_state_dict(state)
