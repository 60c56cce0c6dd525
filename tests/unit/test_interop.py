"""Import from transformers' BERT and the authors' MosaicBERT layout, export back, exactly."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertForMaskedLM, BertModel

from mosaicbert_ds import MosaicBertForMaskedLM, MosaicBertModel
from mosaicbert_ds.errors import UserError
from mosaicbert_ds.interop import read_model_folder
from mosaicbert_ds.interop.import_command import import_folder
from mosaicbert_ds.train.export import export_checkpoint
from tests.helpers.layouts import hub_folder, hub_reference

TOL = 1e-5


def _randomise(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial LayerNorms and biases, so a swapped or missing weight shows in the logits."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def _batch(vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    lengths = [9, 4, 1, 7]
    ids = torch.randint(1, vocab, (4, 9), generator=g)
    mask = torch.zeros(4, 9, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    ids = ids * mask
    tt = torch.zeros_like(ids)
    tt[:, 3:] = 1  # token types 0 and 1 in each sequence
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": tt * mask}


def _hf_bert(tmp_path, cls=BertForMaskedLM):
    cfg = BertConfig(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=40,
        layer_norm_eps=1e-6,
    )
    model = _randomise(cls(cfg))
    model.tie_weights()
    model.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "vocab.txt").write_text("\n".join(f"t{i}" for i in range(99)) + "\n")
    return model, tmp_path / "hf"


def _close_at_real_tokens(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> None:
    m = mask.bool()
    diff = (a[m] - b[m]).abs().max().item()
    assert diff < TOL, f"max |diff| at real tokens {diff:.2e}"


def test_hf_bert_mlm_imports_exactly(tmp_path):
    ref, src = _hf_bert(tmp_path)
    notes = import_folder(src, tmp_path / "out")
    assert notes == ["layout hf-bert"]
    assert (tmp_path / "out" / "vocab.txt").is_file()
    ours = MosaicBertForMaskedLM.from_pretrained(tmp_path / "out").eval()
    assert ours.config.position_embedding_type == "learned" and ours.config.vocab_size == 99
    batch = _batch(99)
    with torch.no_grad():
        _close_at_real_tokens(ours(**batch).logits, ref(**batch).logits, batch["attention_mask"])


def test_hf_bert_model_without_head_imports_and_says_so(tmp_path):
    ref, src = _hf_bert(tmp_path, BertModel)
    notes = import_folder(src, tmp_path / "out")
    assert any("head was initialised" in n for n in notes)
    ours = MosaicBertModel.from_pretrained(tmp_path / "out").eval()
    batch = _batch(99)
    with torch.no_grad():
        a, b = ours(**batch), ref(**batch)
    _close_at_real_tokens(a.last_hidden_state, b.last_hidden_state, batch["attention_mask"])
    assert (a.pooler_output - b.pooler_output).abs().max() < TOL


@pytest.mark.parametrize("heads", [4, 12])  # 12: BERT-Base's count, not a power of two
def test_mosaicbert_hub_imports_exactly(tmp_path, heads):
    sd, cfg, src = hub_folder(tmp_path, d=4 * heads, heads=heads)
    assert import_folder(src, tmp_path / "out") == ["layout mosaicbert-hub"]
    ours = MosaicBertForMaskedLM.from_pretrained(tmp_path / "out").eval()
    c = ours.config
    assert (c.vocab_size, c.position_embedding_type, c.mlp_type, c.head_layer_norm_eps) == (104, "alibi", "glu", 1e-12)
    batch = _batch(104)
    ref = hub_reference(sd, cfg, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    with torch.no_grad():
        _close_at_real_tokens(ours(**batch).logits.double(), ref, batch["attention_mask"])


def test_mosaicbert_hub_import_runs_past_its_alibi_starting_size(tmp_path):
    """The authors' layout (alibi_starting_size 512) imported and run at 1500 tokens: the authors'
    forward (which grows its ALiBi table past the starting size) in float64, within float32 rounding."""
    sd, cfg, src = hub_folder(tmp_path, d=16, heads=4, ff=20)
    import_folder(src, tmp_path / "out")
    ours = MosaicBertForMaskedLM.from_pretrained(tmp_path / "out").eval()
    g = torch.Generator().manual_seed(9)
    ids = torch.randint(1, 104, (1, 1500), generator=g)
    mask, tt = torch.ones_like(ids), torch.zeros_like(ids)
    ref = hub_reference(sd, cfg, ids, mask, tt)
    with torch.no_grad():
        _close_at_real_tokens(ours(input_ids=ids, attention_mask=mask).logits.double(), ref, mask)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda sd: sd.pop("bert.encoder.layer.1.mlp.wo.bias"), "missing weight 'bert.encoder.layer.1.mlp.wo.bias'"),
        (
            lambda sd: sd.__setitem__("bert.encoder.layer.0.extra.weight", torch.zeros(2)),
            "unexpected weight 'bert.encoder.layer.0.extra.weight'",
        ),
        (
            lambda sd: sd.__setitem__("bert.encoder.layer.0.mlp.wo.weight", torch.zeros(32, 41)),
            "bert.layers.0.mlp.Wo.weight has shape (32, 41)",
        ),
        (lambda sd: sd.__setitem__("bert.encoder.layer.2.mlp.wo.bias", torch.zeros(32)), "unexpected weight"),
        (lambda sd: [sd.pop(k) for k in list(sd) if "encoder" in k], "neither BERT nor MosaicBERT"),
    ],
)
def test_anything_that_does_not_fit_is_refused_in_one_line(tmp_path, edit, message):
    sd, cfg, src = hub_folder(tmp_path)
    edit(sd)
    save_file(sd, str(src / "model.safetensors"))
    with pytest.raises(UserError, match="^.*$") as err:
        import_folder(src, tmp_path / "out")
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("which", ["hf-bert", "mosaicbert-hub"])
def test_round_trip_import_export_import_is_exact(tmp_path, which):
    if which == "hf-bert":
        _, src = _hf_bert(tmp_path)
    else:
        _, _, src = hub_folder(tmp_path)
    import_folder(src, tmp_path / "a")
    export_checkpoint(tmp_path / "a", tmp_path / "theirs", layout=which)
    before, after = load_file(src / "model.safetensors"), load_file(tmp_path / "theirs" / "model.safetensors")
    for k, v in before.items():  # every source weight comes back under its own name, unchanged
        assert torch.equal(after[k], v), k
    import_folder(tmp_path / "theirs", tmp_path / "b")
    a, b = read_model_folder(tmp_path / "a"), read_model_folder(tmp_path / "b")
    assert a.config.to_dict() | {"transformers_version": 0} == b.config.to_dict() | {"transformers_version": 0}
    assert a.state.keys() == b.state.keys() and all(torch.equal(a.state[k], b.state[k]) for k in a.state)
    if which == "hf-bert":  # transformers itself loads the export, every weight used
        model, info = BertForMaskedLM.from_pretrained(tmp_path / "theirs", output_loading_info=True)
        assert not info["missing_keys"] and not info["mismatched_keys"]


def test_export_refuses_a_layout_that_cannot_hold_the_model(tmp_path):
    _, _, src = hub_folder(tmp_path)
    import_folder(src, tmp_path / "a")
    with pytest.raises(UserError, match="hf-bert layout needs a bert-base-style model"):
        export_checkpoint(tmp_path / "a", tmp_path / "theirs", layout="hf-bert")
    assert not (tmp_path / "theirs").exists()


def test_glue_loader_imports_the_authors_layout_and_refuses_partial_weights(tmp_path):
    from mosaicbert_ds.glue.models import load_for_task, resolve_model_dir
    from mosaicbert_ds.glue.tasks import get_task
    from mosaicbert_ds.model import MosaicBertForSequenceClassification

    sd, cfg, src = hub_folder(tmp_path)
    model_dir = resolve_model_dir(src, tmp_path / "ft")
    assert model_dir == tmp_path / "ft" / "imported"
    model = load_for_task(model_dir, get_task("rte"))
    assert isinstance(model, MosaicBertForSequenceClassification)
    assert torch.equal(model.bert.layers[1].mlp.Wo.weight, sd["bert.encoder.layer.1.mlp.wo.weight"])

    _, hf = _hf_bert(tmp_path)
    assert resolve_model_dir(hf, tmp_path / "ft2") == hf  # transformers' own BERT loads it whole
    load_for_task(hf, get_task("rte"))
    state = load_file(hf / "model.safetensors")
    state = {k.replace("layer.1.", "block.1."): v for k, v in state.items()}  # not BERT's names any more
    save_file(state, str(hf / "model.safetensors"))
    with pytest.raises(UserError, match="does not fit the chosen model: it has no weight for 'bert.encoder.layer.1"):
        load_for_task(hf, get_task("rte"))


def test_init_from_takes_a_raw_folder_as_its_import_and_refuses_other_sizes(tmp_path):
    from mosaicbert_ds.interop.init_from import config_and_weights

    _, src = _hf_bert(tmp_path)
    import_folder(src, tmp_path / "imported")
    raw_cfg, raw = config_and_weights(str(src), "", {"hidden_dropout_prob": 0.0})
    imp_cfg, imp = config_and_weights(str(tmp_path / "imported"), "", {})
    assert raw.keys() == imp.keys() and all(torch.equal(raw[k], imp[k]) for k in raw)
    assert not any(k.startswith("bert.pooler.") for k in raw)  # the MaskedLM model has no pooler
    assert raw_cfg.hidden_dropout_prob == 0.0 and imp_cfg.hidden_dropout_prob == 0.1  # weight-free overrides apply
    assert (raw_cfg.hidden_size, raw_cfg.position_embedding_type) == (32, "learned")
    with pytest.raises(UserError, match="model.preset 'bert-base' conflicts with model.init_from"):
        config_and_weights(str(src), "bert-base", {})
    with pytest.raises(UserError, match=r"model.overrides.num_hidden_layers=4 conflicts"):
        config_and_weights(str(src), "", {"num_hidden_layers": 4})
    with pytest.raises(UserError, match=r"model.overrides.mlp_type='glu' conflicts"):
        config_and_weights(str(src), "", {"mlp_type": "glu"})
