"""Pretrained text features (``model.embeddings: transformer``): a BERT-family encoder in a
local directory, read offline through ``transformers``, gives each vocabulary word the mean of
its sub-word tokens' last hidden states; errors name the field."""

from __future__ import annotations

import pytest
import torch

from components.config import ModelConfig, ParamsError, parse_params
from components.data.vocab import Vocab
from components.models.network import build_model
from components.models.text import load_transformer_embeddings
from tests.conftest import tiny_params

WORDPIECES = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "red", "ball", "sphere", "tri",
              "##angle", "left", "the"]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A 1-layer BERT with an 8-d hidden state, saved as a local model directory."""
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = tmp_path_factory.mktemp("bert")
    BertTokenizer(vocab={w: i for i, w in enumerate(WORDPIECES)}).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(WORDPIECES), hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=16, max_position_embeddings=16,
    )  # fmt: skip
    BertModel(config).eval().save_pretrained(folder)
    return folder


def test_each_word_is_the_mean_of_its_subword_states(tiny_bert):
    from transformers import AutoModel, AutoTokenizer

    vocab = Vocab(["red", "triangle", "sphere", "ball"])
    table = load_transformer_embeddings(tiny_bert, vocab, 8, batch_size=2)
    assert table.shape == (len(vocab), 8) and table[0].abs().sum() == 0  # <pad>
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    model = AutoModel.from_pretrained(tiny_bert).eval()
    enc = tok(["triangle"], return_tensors="pt")
    assert tok.convert_ids_to_tokens(enc["input_ids"][0]) == ["[CLS]", "tri", "##angle", "[SEP]"]
    with torch.no_grad():
        states = model(**enc).last_hidden_state[0]
    torch.testing.assert_close(table[vocab.stoi["triangle"]], states[1:3].mean(0))
    torch.testing.assert_close(table[1], table[2:].mean(0))  # <unk>: the mean word
    assert not torch.allclose(table[vocab.stoi["ball"]], table[vocab.stoi["sphere"]])
    net = build_model(ModelConfig(embed_dim=8, hidden=16), len(vocab), table)
    assert torch.equal(net.query.embed.weight.data, table)


def test_errors_name_the_field(tiny_bert, tmp_path):
    vocab = Vocab(["red"])
    with pytest.raises(ParamsError, match="model.embed_dim: 16, but the encoder"):
        load_transformer_embeddings(tiny_bert, vocab, 16)
    with pytest.raises(ParamsError, match="model.text_model_path: .* holds no config.json"):
        load_transformer_embeddings(tmp_path, vocab, 8)
    raw = tiny_params()
    raw["model"]["embeddings"] = "transformer"
    with pytest.raises(ValueError, match="text_model_path is required"):
        parse_params(raw)


def test_cooccurrence_vectors_follow_the_contexts_words_share():
    """Label-free vectors from query text: words used in the same slots end up close; a word
    seen only in target-style queries gets a fitted vector, not a random one."""
    from components.models.text import fit_cooccurrence

    texts = ["the red circle", "the blue circle", "the red square", "the blue square"] * 5
    texts += ["find the crimson ball", "find the navy ball"] * 5
    vocab = Vocab.build(texts)
    table = fit_cooccurrence(texts, vocab, dim=8)
    assert table.shape == (len(vocab), 8) and table[0].abs().sum() == 0  # <pad>
    cos = torch.nn.functional.cosine_similarity

    def sim(a: str, b: str) -> float:
        return float(cos(table[vocab.stoi[a]], table[vocab.stoi[b]], dim=0))

    assert sim("red", "blue") > 0.9 and sim("circle", "square") > 0.9
    assert sim("red", "blue") > sim("red", "circle") + 0.5
    assert fit_cooccurrence(texts, vocab, dim=8).equal(table)  # deterministic
