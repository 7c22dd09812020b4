"""Pretrained text features (``model.embeddings: transformer``): a BERT-family encoder in a
local directory, read offline through ``transformers``, gives each vocabulary word the mean of
its sub-word tokens' last hidden states; the same encoder reading whole queries
(``model.text_encoder: contextual``); errors name the field."""

from __future__ import annotations

import pytest
import torch

from components.config import ModelConfig, ParamsError, parse_params
from components.data.vocab import Vocab
from components.models.network import build_model
from components.models.text import contextual_subtokens, load_transformer_embeddings
from tests.conftest import one_epoch, tiny_params

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


def _contextual(tiny_bert, vocab, **model):
    cfg = ModelConfig(
        embed_dim=8, hidden=16, text_encoder="contextual", text_model_path=str(tiny_bert), **model
    )
    table = contextual_subtokens(tiny_bert, vocab, 8)
    return cfg, table, build_model(cfg, len(vocab), table).eval()


def test_contextual_encoder_reads_the_query_as_the_pretrained_model_does(tiny_bert):
    from transformers import AutoModel, AutoTokenizer

    vocab = Vocab(["red", "triangle", "ball", "left", "the"])
    cfg, table, net = _contextual(tiny_bert, vocab)
    tokens = torch.tensor([[vocab.stoi[w] for w in ("the", "red", "triangle")] + [0, 0]])
    with torch.no_grad():
        words, q = net.query(tokens, torch.tensor([3]))
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    bert = AutoModel.from_pretrained(tiny_bert).eval()
    enc = tok(["the red triangle"], return_tensors="pt")
    assert tok.convert_ids_to_tokens(enc["input_ids"][0]) == [
        "[CLS]", "the", "red", "tri", "##angle", "[SEP]"
    ]  # fmt: skip
    with torch.no_grad():
        states = bert(**enc).last_hidden_state[0]
        pieces = bert.get_input_embeddings()(enc["input_ids"][0])
    # a word = the mean of its pieces, read in the context of the whole query
    torch.testing.assert_close(q[0, 2], net.query.proj(states[3:5].mean(0)))
    torch.testing.assert_close(q[0, 1], net.query.proj(states[2]))
    torch.testing.assert_close(words[0, 2], pieces[3:5].mean(0))
    assert words[0, 3:].abs().sum() == 0 and q.shape == (1, 5, 16)
    # a longer query in the same batch changes nothing of this one (attention masked)
    other = torch.tensor([[vocab.stoi[w] for w in ("the", "ball", "left", "the", "red")]])
    with torch.no_grad():
        _, q2 = net.query(torch.cat([tokens, other]), torch.tensor([3, 5]))
    torch.testing.assert_close(q2[0, :3], q[0, :3], atol=1e-5, rtol=1e-5)
    # <unk> (and DMMI's erased word) is read as the encoder's [MASK]
    assert table[1, 0] == tok.mask_token_id and table[-1, :3].tolist() == [2, 3, 0]


def test_contextual_encoder_is_fine_tuned_and_reloads_from_its_state_dict(tiny_bert):
    vocab = Vocab(["red", "triangle", "ball"])
    for arch in ("sda", "dmmi"):
        cfg, _, net = _contextual(tiny_bert, vocab, arch=arch)
        tokens, lengths = torch.tensor([[2, 3, 4], [3, 0, 0]]), torch.tensor([3, 1])
        image = torch.randn(2, 3, 32, 32)
        sp = torch.randint(0, 8, (2, 32, 32))
        net.train()
        out = net(image, tokens, lengths, sp)
        out["response"].mean().backward()
        grads = [p.grad for p in net.query.parameters()]
        # every parameter gets a gradient (DDP with several workers refuses one that does
        # not: the encoder's pooler is dropped) and the encoder learns
        assert all(g is not None for g in grads), arch
        assert any(g.abs().sum() > 0 for g in grads), arch
        again = build_model(cfg, len(vocab))  # as load_trained rebuilds it: config only
        again.load_state_dict(net.state_dict())
        net.eval(), again.eval()
        with torch.no_grad():
            torch.testing.assert_close(
                again(image, tokens, lengths, sp)["response"],
                net(image, tokens, lengths, sp)["response"],
            )


def test_a_half_precision_checkpoint_runs_in_float32(tiny_bert, tmp_path):
    from transformers import AutoModel

    AutoModel.from_pretrained(tiny_bert).to(torch.bfloat16).save_pretrained(tmp_path)
    for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_bert / name).is_file():
            (tmp_path / name).write_bytes((tiny_bert / name).read_bytes())
    vocab = Vocab(["red", "ball"])
    _, _, net = _contextual(tmp_path, vocab)
    assert {p.dtype for p in net.parameters()} == {torch.float32}
    with torch.no_grad():
        words, q = net.query(torch.tensor([[2, 3]]), torch.tensor([2]))
    assert q.dtype == torch.float32 and torch.isfinite(q).all()


def test_contextual_encoder_params_name_the_field(tiny_bert):
    raw = tiny_params()
    raw["model"]["text_encoder"] = "contextual"
    with pytest.raises(ValueError, match="text_model_path is required when text_encoder"):
        parse_params(raw)
    raw["model"].update(text_model_path=str(tiny_bert), embeddings="transformer")
    with pytest.raises(ValueError, match="embeddings: transformer has no effect"):
        parse_params(raw)
    with pytest.raises(ParamsError, match="model.embed_dim: 16, but the encoder"):
        contextual_subtokens(tiny_bert, Vocab(["red"]), 16)


@pytest.mark.slow
def test_one_epoch_of_dmmi_with_a_contextual_text_encoder(tiny_bert, tmp_path):
    """``adaseg prepare``, ``pretrain``, ``evaluate`` as a user runs them with DMMI's network
    reading queries through a local BERT (fine-tuned in a Ray Train worker, reloaded by
    ``evaluate`` from its state dict and the model folder's config)."""
    raw = tiny_params()
    raw["model"].update(
        arch="dmmi", text_encoder="contextual", text_model_path=str(tiny_bert), embed_dim=8
    )
    m = one_epoch(tmp_path, raw, evaluate=True)
    assert 0 <= m["pretrain"]["val_oiou"] <= 1
    assert 0 <= m["evaluate"]["model"]["target_test"]["oiou"] <= 1


def test_a_network_without_a_word_table_is_left_as_it_is(tiny_bert):
    """The contextual text encoder reads a pretrained model's sub-words: it has no W to ground
    (the stage then grounds nothing), and an empty map changes nothing."""
    vocab = Vocab(["the", "red"])
    cfg = ModelConfig(
        widths=[8, 16, 16, 24], hidden=16, embed_dim=8, text_encoder="contextual",
        text_model_path=str(tiny_bert),
    )  # fmt: skip
    from components.adaptation.sda.grounding import apply_grounding, word_table

    model = build_model(cfg, len(vocab), contextual_subtokens(tiny_bert, vocab, 8))
    assert word_table(model) is None
    assert apply_grounding(model, vocab, {}) == 0
    with pytest.raises(ValueError, match="no word table"):
        apply_grounding(model, vocab, {"red": "the"})
