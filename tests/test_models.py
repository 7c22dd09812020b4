"""Contract tests of the base network (STYLE.md #9a): shapes, no NaNs, gradients, learning."""

import numpy as np
import pytest
import torch

from components.config import ModelConfig
from components.data.vocab import Vocab
from components.losses import multiscale_bce
from components.models.interaction import region_max_pool
from components.models.network import build_model, load_trained, predict_masks, save_trained
from components.models.text import load_glove

CFG = ModelConfig(widths=[8, 16, 16, 24], hidden=16, embed_dim=12, num_superpixels=10)


def _batch(b=4, size=32, vocab=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(2, vocab, (b, 6), generator=g)
    lengths = torch.tensor([6, 3, 1, 4][:b])
    for i, n in enumerate(lengths):
        tokens[i, n:] = 0
    image = torch.randn(b, 3, size, size, generator=g)
    return {
        "image": image,
        "tokens": tokens,
        "lengths": lengths,
        "superpixels": torch.randint(0, 7, (b, size, size), generator=g),  # regions 7..9 empty
        "mask": _boxes(b, size),
    }


def _boxes(b, size):
    """One box per sample at a different place: learnable by overfitting."""
    mask = torch.zeros(b, size, size)
    for i in range(b):
        o = 4 + 5 * i
        mask[i, o : o + 10, o : o + 8] = 1
    return mask


def _args(batch):
    return batch["image"], batch["tokens"], batch["lengths"], batch["superpixels"]


def _forward(model, batch):
    return model(*_args(batch))


def test_output_shapes_and_exposed_tensors():
    model = build_model(CFG, 20)
    out = _forward(model, _batch())
    assert [tuple(lg.shape) for lg in out["logits"]] == [(4, 1, 16, 16), (4, 1, 8, 8), (4, 1, 4, 4)]
    assert out["response"].shape == (4, 32, 32)
    assert out["alpha"].shape == (4, 4 * 4, 6)  # deepest level: (B, H*W, N)
    assert out["features"].shape == (4, 24, 4, 4)  # last encoder layer
    assert out["words"].shape == (4, 6, 12) and out["query"].shape == (4, 6, 16)
    for a in out["alphas"]:
        assert torch.allclose(a.sum(-1), torch.ones(()))  # a distribution over words
    # padded words get no attention
    assert out["alpha"][2, :, 1:].abs().max() == 0
    assert all(torch.isfinite(t).all() for t in out["logits"])


def test_every_parameter_gets_a_gradient():
    model = build_model(CFG, 20)
    batch = _batch()
    out = _forward(model, batch)
    multiscale_bce(out["logits"], out["full_logits"], batch["mask"]).backward()
    # padding row of the embedding is the only parameter slice without gradient
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert missing == []


def test_loss_goes_down_on_a_tiny_batch():
    torch.manual_seed(0)
    model = build_model(CFG, 20)
    batch = _batch()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        out = _forward(model, batch)
        loss = multiscale_bce(out["logits"], out["full_logits"], batch["mask"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]


def test_region_max_pool_by_hand():
    x = torch.tensor([[[1.0], [5.0], [2.0], [-3.0]]])  # (1, P=4, C=1)
    labels = torch.tensor([[0, 0, 2, 2]])
    pooled, valid = region_max_pool(x, labels, 3)
    assert pooled.flatten().tolist() == [5.0, 0.0, 2.0]
    assert valid.flatten().tolist() == [True, False, True]


def test_inference_rule_half_max_and_empty():
    resp = torch.tensor([[[0.9, 0.5], [0.44, 0.1]], [[0.3, 0.2], [0.1, 0.0]]])
    masks, scores = predict_masks(resp, empty_threshold=0.5)
    assert masks[0].tolist() == [[True, True], [False, False]]  # > 0.45
    assert not masks[1].any()  # max 0.3 < 0.5: one-to-zero
    assert scores.tolist() == pytest.approx([0.9, 0.3])


def test_save_and_load_trained(tmp_path):
    model = build_model(CFG, 20)
    save_trained(tmp_path, model, CFG, 20, {"phase": "pretrain"})
    again, info = load_trained(tmp_path)
    assert info["phase"] == "pretrain"
    batch = _batch()
    model.eval()
    again.eval()
    assert torch.allclose(_forward(model, batch)["response"], _forward(again, batch)["response"])


def test_glove_loader(tmp_path):
    vocab = Vocab(["red", "circle", "ball"])
    path = tmp_path / "glove.txt"
    path.write_text("red 0.1 0.2 0.3\nunrelated 1 1 1\ncircle -1 0 1\n")
    table = load_glove(path, vocab, 3)
    assert table.shape == (len(vocab), 3)
    assert table[vocab.stoi["red"]].tolist() == pytest.approx([0.1, 0.2, 0.3])
    assert table[0].abs().sum() == 0  # <pad>
    assert np.abs(table[vocab.stoi["ball"]].numpy()).max() < 1  # small random init
    path.write_text("red 0.1 0.2\n")
    with pytest.raises(ValueError, match=r"glove.txt:1: expected 3 values, got 2"):
        load_glove(path, vocab, 3)
    model = build_model(CFG.model_copy(update={"embed_dim": 3}), len(vocab), table)
    assert torch.equal(model.query.embed.weight.data, table)


def test_image_encoded_once_decodes_as_the_whole_forward():
    """Word grounding asks many queries of one image through ``encode_image`` + ``decode``:
    the same numbers as ``forward``."""
    torch.manual_seed(0)
    model = build_model(CFG, 20).eval()
    b = _batch()
    whole = model(b["image"], b["tokens"], b["lengths"], b["superpixels"])
    feats = model.encode_image(b["image"])
    split = model.decode(feats, b["tokens"], b["lengths"], b["superpixels"])
    assert torch.equal(whole["response"], split["response"])
    assert torch.equal(whole["features"], split["features"])


@pytest.mark.parametrize("arch,clip", [("sda", False), ("sda", True), ("dmmi", False)])
def test_encoder_features_are_the_forwards_features(arch, clip):
    """Fig. 7's features (``pipelines.adapt.encoder_features``) equal the forward's
    ``features``, whether the network encodes the image apart from the query or not, and for
    a video sample's clip."""
    from pipelines.adapt import encoder_features

    cfg = ModelConfig.model_validate({**CFG.model_dump(), "arch": arch, "dmmi": {"ccr_heads": 4}})
    model = build_model(cfg, 20).eval()
    batch = _batch()
    kwargs = {}
    if clip:
        batch["clip"] = kwargs["clip"] = torch.randn(4, 2, 3, 32, 32)
    with torch.no_grad():
        forward = model(*_args(batch), **kwargs)
        assert torch.equal(encoder_features(model, batch), forward["features"])
        if clip:  # the clip counts: the features differ from the annotated frame's alone
            assert not torch.equal(forward["features"], _forward(model, batch)["features"])
