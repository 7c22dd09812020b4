"""ResNet backbones with offline ImageNet weights (``model.backbone: resnet18..resnet101``):
torchvision's parameter names, frozen batch norms equal to BatchNorm2d in eval mode, weight
files found at the given path or in torch's hub cache, a clear error when there are none, a
fresh network loaded on the driver's weights, and a random init only when asked for."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from components.config import ModelConfig, ParamsError
from components.models.network import build_model
from components.models.resnet import FrozenBatchNorm2d, ResNet, find_weights
from components.models.visual import ResNetEncoder, imagenet_state, load_backbone

CFG = ModelConfig(backbone="resnet18", hidden=16, embed_dim=12, num_superpixels=10)


def torchvision_file(path, name="resnet18", seed=0):
    """A state dict as torchvision writes one: BatchNorm2d keys with ``num_batches_tracked``
    and the ImageNet classifier ``fc``."""
    g = torch.Generator().manual_seed(seed)
    body = ResNet(name, frozen_bn=True).state_dict()
    state = {
        k: torch.rand(v.shape, generator=g) + (0.5 if "var" in k else 0) for k, v in body.items()
    }
    for k in [k for k in body if k.endswith("running_var")]:
        state[k.replace("running_var", "num_batches_tracked")] = torch.tensor(7)
    width = 512 if name in ("resnet18", "resnet34") else 2048
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, width), torch.zeros(1000)
    torch.save(state, path)
    return state


def test_parameter_names_are_torchvisions():
    keys = ResNet("resnet50", frozen_bn=True).state_dict().keys()
    # torchvision's resnet50 has 320 entries: these 265 + fc.weight, fc.bias + 53 num_batches
    assert len(keys) == 265
    for key in ("conv1.weight", "bn1.running_var", "layer1.0.downsample.1.weight",
                "layer3.5.conv3.weight", "layer4.2.bn3.bias"):  # fmt: skip
        assert key in keys
    assert "layer2.0.conv3.weight" not in ResNet("resnet18", frozen_bn=True).state_dict()
    assert len(ResNet("resnet101", frozen_bn=True).layer3) == 23


def test_frozen_batch_norm_is_batch_norm_in_eval_mode():
    bn = nn.BatchNorm2d(6).eval()
    for name in ("weight", "bias", "running_mean"):
        getattr(bn, name).data.uniform_(-1, 1)
    bn.running_var.data.uniform_(0.5, 2)
    frozen = FrozenBatchNorm2d(6)
    frozen.load_state_dict({k: v for k, v in bn.state_dict().items() if "num_batches" not in k})
    x = torch.randn(2, 6, 5, 5)
    torch.testing.assert_close(frozen(x), bn(x))
    assert not list(frozen.parameters())  # frozen: nothing for the optimizer


def test_weights_load_from_the_given_file_or_the_hub_cache(tmp_path, monkeypatch):
    path = tmp_path / "weights.pth"
    state = torchvision_file(path)
    cfg = CFG.model_copy(update={"backbone_weights": str(path)})
    loaded = imagenet_state(cfg)
    assert loaded.keys() == {k for k in state if not k.startswith("fc.") and "num_b" not in k}
    torch.testing.assert_close(
        loaded["layer4.1.bn2.running_var"], state["layer4.1.bn2.running_var"]
    )
    model = build_model(cfg, 20)
    load_backbone(model, loaded)
    torch.testing.assert_close(model.visual.net.conv1.weight, state["conv1.weight"])
    # torchvision / timm downloads live in torch's hub cache, under torchvision's file name
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = tmp_path / "torch/hub/checkpoints/resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True)
    path.rename(cached)
    assert find_weights("resnet18", None) == cached
    assert imagenet_state(CFG).keys() == loaded.keys()


def test_no_weights_is_an_error_saying_how_to_provide_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    with pytest.raises(ParamsError, match=r"resnet18 needs ImageNet weights .* resnet18-f37072fd"):
        imagenet_state(CFG)
    with pytest.raises(ParamsError, match=r"model.backbone_weights: .*nope.pth is not a file"):
        imagenet_state(CFG.model_copy(update={"backbone_weights": str(tmp_path / "nope.pth")}))
    other = tmp_path / "r50.pth"
    torchvision_file(other, "resnet50")
    with pytest.raises(ParamsError, match=r"r50.pth holds no weights of this ResNet depth"):
        imagenet_state(CFG.model_copy(update={"backbone_weights": str(other)}))
    assert imagenet_state(CFG.model_copy(update={"backbone_pretrained": False})) is None


def test_resnet_network_trains_and_renormalises_its_input(tmp_path):
    path = tmp_path / "weights.pth"
    torchvision_file(path)
    cfg = CFG.model_copy(update={"backbone_weights": str(path)})
    model = build_model(cfg, 20)
    load_backbone(model, imagenet_state(cfg))
    enc = model.visual
    assert isinstance(enc, ResNetEncoder) and enc.out_channels == [64, 128, 256, 512]
    pixels = torch.rand(1, 3, 8, 8)  # the pipeline's (x - 0.5) / 0.25 -> ImageNet's mean / std
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(
        (pixels - 0.5) / 0.25 * enc.scale + enc.shift,
        (pixels - mean[:, None, None]) / std[:, None, None],
    )
    tokens = torch.tensor([[3, 4, 5, 0], [6, 7, 0, 0]])
    out = model(
        torch.randn(2, 3, 64, 64), tokens, torch.tensor([3, 2]), torch.zeros(2, 64, 64).long()
    )
    loss = sum(lg.float().mean() for lg in out["logits"])
    loss.backward()
    trainable = [p for p in model.visual.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable)
    scratch = build_model(CFG.model_copy(update={"backbone_pretrained": False}), 20)
    assert any(isinstance(m, nn.GroupNorm) for m in scratch.visual.modules())


def test_pretrain_without_weights_stops_before_any_work(tmp_path, tiny_raw, monkeypatch):
    import yaml

    from tests.conftest import run_in

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_raw))
    cmd = ["python", "-m", "pipelines.cli", "-S", "model.backbone=resnet50", "pretrain"]
    cmd += ["--data", "nowhere", "--out", "m", "--metrics", "m.json", "--plots", "p.csv"]
    proc = run_in(tmp_path, *cmd, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "model.backbone resnet50 needs ImageNet weights" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "m").exists()
