"""MosaicBERT model: presets, unpadded vs padded execution, heads, transformers round trip."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForMaskedLM, AutoModelForSequenceClassification

from mosaicbert_ds import MosaicBertConfig, MosaicBertForMaskedLM, MosaicBertForSequenceClassification, MosaicBertModel
from mosaicbert_ds.padding import cu_seqlens_from_lengths

ABLATIONS = {
    "mosaicbert": {},
    "learned_positions": dict(position_embedding_type="learned"),
    "gelu_mlp": dict(mlp_type="gelu"),
    "glu_two_matmuls": dict(glu_fused=False),
    "padded": dict(unpad=False),
    "fp32_layernorm": dict(low_precision_layernorm=False),
    "attention_dropout": dict(attention_probs_dropout_prob=0.1),
    "no_vocab_padding": dict(pad_vocab_size_multiple=1, vocab_size=1000),
    "bert_baseline_like": dict(
        position_embedding_type="learned",
        mlp_type="gelu",
        unpad=False,
        low_precision_layernorm=False,
        attention_probs_dropout_prob=0.1,
    ),
}


def param_count(name: str, **kw) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in MosaicBertForMaskedLM(MosaicBertConfig.from_name(name, **kw)).parameters())


def test_preset_parameter_counts():
    assert round(param_count("base") / 1e6, 1) == 137.4
    assert 430e6 < param_count("large") < 440e6
    assert 109e6 < param_count("bert-base") < 111e6
    assert param_count("tiny") < 1e6


def test_presets_and_vocab_padding():
    assert MosaicBertConfig.from_name("base").vocab_size == 30528
    assert MosaicBertConfig.from_name("bert-base").vocab_size == 30522
    assert MosaicBertConfig.from_name("base", vocab_size=30522).vocab_size == 30528
    c = MosaicBertConfig.from_name("bert-base")
    assert (c.position_embedding_type, c.mlp_type, c.unpad, c.low_precision_layernorm) == (
        "learned",
        "gelu",
        False,
        False,
    )
    assert c.attention_probs_dropout_prob == 0.1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(hidden_size=100, num_attention_heads=3), "must divide hidden_size"),
        (dict(hidden_dropout_prob=-0.1), "hidden_dropout_prob"),
        (dict(attention_probs_dropout_prob=1.5), "attention_probs_dropout_prob"),
        (dict(position_embedding_type="rope"), "position_embedding_type"),
        (dict(mlp_type="swiglu"), "mlp_type"),
        (dict(attention_impl="cuda"), "attention_impl"),
    ],
)
def test_bad_config_is_rejected_clearly(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MosaicBertConfig.from_name("tiny", **kwargs)


def test_unknown_preset_and_key():
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        MosaicBertConfig.from_name("huge")
    with pytest.raises(ValueError, match="unknown model config key"):
        MosaicBertConfig.from_name("tiny", hiden_size=64)


def make_batch(lengths, seqlen, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (len(lengths), seqlen), generator=g)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    ids = ids * mask
    flat = ids[mask.bool()]
    return ids, mask, flat, cu_seqlens_from_lengths(torch.tensor(lengths))


@pytest.mark.parametrize("name", list(ABLATIONS))
def test_padded_and_unpadded_inputs_agree(name):
    torch.manual_seed(0)
    model = MosaicBertModel(MosaicBertConfig.from_name("tiny", **ABLATIONS[name])).eval()
    ids, mask, flat, cu = make_batch([9, 1, 5, 12], 12, 900)
    padded = model(ids, attention_mask=mask).last_hidden_state
    packed = model(flat, cu_seqlens=cu, max_seqlen=12).last_hidden_state
    assert padded.shape == (4, 12, 64) and packed.shape == (flat.numel(), 64)
    torch.testing.assert_close(padded[mask.bool()], packed, rtol=1e-5, atol=1e-5)
    if model.config.unpad:  # re-padded once at the end: pads are zero
        assert (padded[~mask.bool()] == 0).all()


@pytest.mark.parametrize("name", ["mosaicbert", "learned_positions", "padded"])
def test_sequence_output_is_independent_of_batch_and_padding(name):
    torch.manual_seed(0)
    model = MosaicBertModel(MosaicBertConfig.from_name("tiny", **ABLATIONS[name])).eval()
    ids, mask, _, _ = make_batch([7, 3, 11], 11, 900)
    full = model(ids, attention_mask=mask).last_hidden_state
    alone = model(ids[1:2, :3], attention_mask=mask[1:2, :3]).last_hidden_state
    more_pad = torch.cat([ids[1:2], torch.zeros(1, 20, dtype=torch.long)], 1)
    more_pad_mask = torch.cat([mask[1:2], torch.zeros(1, 20, dtype=torch.long)], 1)
    padded_more = model(more_pad, attention_mask=more_pad_mask).last_hidden_state
    torch.testing.assert_close(full[1, :3], alone[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(full[1, :3], padded_more[0, :3], rtol=1e-5, atol=1e-5)


def test_alibi_model_extrapolates_past_training_length():
    model = MosaicBertModel(MosaicBertConfig.from_name("tiny", max_position_embeddings=16)).eval()
    ids, mask, flat, cu = make_batch([40, 25], 40, 900)
    out = model(flat, cu_seqlens=cu, max_seqlen=40).last_hidden_state
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["mosaicbert", "learned_positions"])
def test_2048_tokens_padded_packed_and_alone_agree(name):
    """Sequences of 2048 and 700 tokens (learned positions: 2048 of them) beside short ones, tiny
    widths on the CPU: the padded batch, the packed one and the long sequence alone agree."""
    torch.manual_seed(0)
    overrides = {**ABLATIONS[name], "max_position_embeddings": 2048}
    model = MosaicBertModel(MosaicBertConfig.from_name("tiny", **overrides)).eval()
    ids, mask, flat, cu = make_batch([2048, 5, 700], 2048, 900)
    with torch.no_grad():
        padded = model(ids, attention_mask=mask).last_hidden_state
        packed = model(flat, cu_seqlens=cu, max_seqlen=2048).last_hidden_state
        alone = model(ids[:1]).last_hidden_state
    torch.testing.assert_close(padded[mask.bool()], packed, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded[0], alone[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(ABLATIONS))
def test_every_ablation_trains_and_gradients_reach_every_parameter(name):
    torch.manual_seed(0)
    model = MosaicBertForMaskedLM(MosaicBertConfig.from_name("tiny", **ABLATIONS[name])).train()
    ids, mask, flat, cu = make_batch([9, 1, 5, 12], 12, 900)
    labels = torch.full_like(flat, -100)
    masked = torch.tensor([0, 3, 10, 20])
    labels[masked] = flat[masked]
    out = model(flat, cu_seqlens=cu, max_seqlen=12, labels=labels, masked_positions=masked)
    assert out.logits.shape == (4, model.config.vocab_size)  # head ran on masked tokens only
    assert torch.equal(out.masked_labels, flat[masked])
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient reached {missing}"


def test_mlm_loss_same_for_padded_labels_and_masked_positions():
    torch.manual_seed(0)
    model = MosaicBertForMaskedLM(MosaicBertConfig.from_name("tiny")).eval()
    ids, mask, flat, cu = make_batch([6, 4], 6, 900)
    padded_labels = torch.full_like(ids, -100)
    padded_labels[0, 2] = ids[0, 2]
    padded_labels[1, 3] = ids[1, 3]
    flat_labels = torch.full_like(flat, -100)
    flat_labels[[2, 9]] = flat[[2, 9]]
    a = model(ids, attention_mask=mask, labels=padded_labels).loss
    a2 = model(ids, attention_mask=mask, labels=padded_labels, masked_positions=torch.tensor([2, 6 + 3])).loss
    torch.testing.assert_close(a, a2)
    b = model(flat, cu_seqlens=cu, max_seqlen=6, labels=flat_labels, masked_positions=torch.tensor([2, 9])).loss
    c = model(flat, cu_seqlens=cu, max_seqlen=6, labels=flat_labels).loss
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(b, c)


def test_low_precision_layernorm_runs_in_bf16_under_autocast():
    ln_model = MosaicBertModel(MosaicBertConfig.from_name("tiny"))
    ln = ln_model.embeddings.LayerNorm
    x = torch.randn(5, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ln(x).dtype == torch.bfloat16
    ln.low_precision = False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ln(x).dtype == torch.float32


def test_auto_classes_round_trip(tmp_path):
    torch.manual_seed(0)
    model = MosaicBertForMaskedLM(MosaicBertConfig.from_name("tiny")).eval()
    model.save_pretrained(tmp_path / "mlm")
    assert (tmp_path / "mlm" / "model.safetensors").exists()
    assert AutoConfig.from_pretrained(tmp_path / "mlm").model_type == "mosaicbert"
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path / "mlm").eval()
    assert isinstance(loaded, MosaicBertForMaskedLM)
    ids, mask, _, _ = make_batch([5, 3], 5, 900)
    torch.testing.assert_close(loaded(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)
    # Tied decoder: one tensor serves as input embedding and output projection.
    assert "head.decoder.weight" not in dict(loaded.named_parameters())

    clf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "mlm", num_labels=3)
    assert isinstance(clf, MosaicBertForSequenceClassification)
    torch.testing.assert_close(clf.bert.embeddings.word_embeddings.weight, model.bert.embeddings.word_embeddings.weight)


def test_classification_and_regression_heads():
    torch.manual_seed(0)
    ids, mask, flat, cu = make_batch([6, 4, 2], 6, 900)
    clf = MosaicBertForSequenceClassification(MosaicBertConfig.from_name("tiny", num_labels=3)).eval()
    out = clf(flat, cu_seqlens=cu, max_seqlen=6, labels=torch.tensor([0, 2, 1]))
    assert out.logits.shape == (3, 3) and out.loss.item() > 0
    torch.testing.assert_close(clf(ids, attention_mask=mask).logits, out.logits, rtol=1e-5, atol=1e-5)
    reg = MosaicBertForSequenceClassification(MosaicBertConfig.from_name("tiny", num_labels=1)).eval()
    out = reg(flat, cu_seqlens=cu, max_seqlen=6, labels=torch.tensor([0.5, 4.0, 2.0]))
    assert reg.config.problem_type == "regression"
    torch.testing.assert_close(
        out.loss, torch.nn.functional.mse_loss(out.logits.squeeze(-1), torch.tensor([0.5, 4.0, 2.0]))
    )


@pytest.mark.parametrize(
    "name, sizes, vocab, baseline",
    [
        ("tiny", (2, 64, 2, 128), 1024, False),
        ("base", (12, 768, 12, 3072), 30528, False),
        ("large", (24, 1024, 16, 4096), 30528, False),
        ("bert-base", (12, 768, 12, 3072), 30522, True),
        ("bert-large", (24, 1024, 16, 4096), 30522, True),
    ],
)
def test_presets_hold_the_papers_sizes_and_switches(name, sizes, vocab, baseline):
    c = MosaicBertConfig.from_name(name)
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.intermediate_size) == sizes
    assert c.vocab_size == vocab
    switches = (c.position_embedding_type, c.mlp_type, c.unpad, c.low_precision_layernorm)
    assert switches == (("learned", "gelu", False, False) if baseline else ("alibi", "glu", True, True))
    assert (c.attention_probs_dropout_prob, c.pad_vocab_size_multiple) == ((0.1, 1) if baseline else (0.0, 64))
    if baseline:  # a baseline preset is its MosaicBERT size with the baseline's switches, nothing else
        mosaic = MosaicBertConfig.from_name(name.removeprefix("bert-")).to_dict()
        differ = {k for k, v in c.to_dict().items() if mosaic.get(k) != v}
        assert differ == {
            "vocab_size",
            "pad_vocab_size_multiple",
            "position_embedding_type",
            "mlp_type",
            "unpad",
            "low_precision_layernorm",
            "attention_probs_dropout_prob",
        }
