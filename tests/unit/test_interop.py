"""Import from transformers' BERT and the authors' MosaicBERT layout, export back, exactly."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertForMaskedLM, BertModel

from mosaicbert_ds import MosaicBertForMaskedLM, MosaicBertModel
from mosaicbert_ds.errors import UserError
from mosaicbert_ds.interop import read_model_folder
from mosaicbert_ds.interop.cli import import_folder
from mosaicbert_ds.train.export import export_checkpoint

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


# --- the authors' layout: state dict built with their names, checked against a computation here ---


def _hub_folder(tmp_path, vocab=104, d=32, heads=4, ff=40, layers=2, eps=1e-6):
    g = torch.Generator().manual_seed(11)
    r = lambda *s: torch.randn(*s, generator=g) * 0.2  # noqa: E731
    sd = {
        "bert.embeddings.word_embeddings.weight": r(vocab, d),
        "bert.embeddings.token_type_embeddings.weight": r(2, d),
        "bert.embeddings.LayerNorm.weight": 1 + r(d),
        "bert.embeddings.LayerNorm.bias": r(d),
    }
    for i in range(layers):
        t = f"bert.encoder.layer.{i}"
        sd.update(
            {
                f"{t}.attention.self.Wqkv.weight": r(3 * d, d),
                f"{t}.attention.self.Wqkv.bias": r(3 * d),
                f"{t}.attention.output.dense.weight": r(d, d),
                f"{t}.attention.output.dense.bias": r(d),
                f"{t}.attention.output.LayerNorm.weight": 1 + r(d),
                f"{t}.attention.output.LayerNorm.bias": r(d),
                f"{t}.mlp.gated_layers.weight": r(2 * ff, d),
                f"{t}.mlp.wo.weight": r(d, ff),
                f"{t}.mlp.wo.bias": r(d),
                f"{t}.mlp.layernorm.weight": 1 + r(d),
                f"{t}.mlp.layernorm.bias": r(d),
            }
        )
    p = "cls.predictions"
    sd.update(
        {
            f"{p}.transform.dense.weight": r(d, d),
            f"{p}.transform.dense.bias": r(d),
            f"{p}.transform.LayerNorm.weight": 1 + r(d),
            f"{p}.transform.LayerNorm.bias": r(d),
            f"{p}.decoder.bias": r(vocab),
        }
    )
    sd[f"{p}.decoder.weight"] = sd["bert.embeddings.word_embeddings.weight"].clone()
    cfg = {
        "architectures": ["BertForMaskedLM"],
        "model_type": "bert",
        "vocab_size": vocab,
        "hidden_size": d,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": ff,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.0,
        "max_position_embeddings": 512,
        "alibi_starting_size": 512,
        "type_vocab_size": 2,
        "layer_norm_eps": eps,
        "position_embedding_type": "absolute",
        "pad_token_id": 0,
    }
    src = tmp_path / "hub"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(cfg))
    save_file(sd, str(src / "model.safetensors"))
    return sd, cfg, src


def _hub_reference(sd, cfg, ids, mask, tt):
    """The authors' MosaicBERT forward, one sequence at a time (no padding), in float64."""
    d, h, eps = cfg["hidden_size"], cfg["num_attention_heads"], cfg["layer_norm_eps"]
    sd = {k: v.double() for k, v in sd.items()}
    ln = lambda x, p, e=eps: F.layer_norm(x, (d,), sd[p + ".weight"], sd[p + ".bias"], e)  # noqa: E731
    slopes = torch.tensor([2 ** (-8 * (i + 1) / h) for i in range(h)], dtype=torch.float64)
    out = torch.zeros(*ids.shape, cfg["vocab_size"], dtype=torch.float64)
    for b in range(ids.shape[0]):
        n = int(mask[b].sum())
        x = (
            sd["bert.embeddings.word_embeddings.weight"][ids[b, :n]]
            + sd["bert.embeddings.token_type_embeddings.weight"][tt[b, :n]]
        )
        x = ln(x, "bert.embeddings.LayerNorm")
        pos = torch.arange(n, dtype=torch.float64)
        alibi = -slopes[:, None, None] * (pos[:, None] - pos[None, :]).abs()
        for i in range(cfg["num_hidden_layers"]):
            t = f"bert.encoder.layer.{i}"
            qkv = x @ sd[f"{t}.attention.self.Wqkv.weight"].T + sd[f"{t}.attention.self.Wqkv.bias"]
            q, k, v = qkv.view(n, 3, h, d // h).permute(1, 2, 0, 3)
            att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // h) + alibi, dim=-1) @ v
            a = (
                att.transpose(0, 1).reshape(n, d) @ sd[f"{t}.attention.output.dense.weight"].T
                + sd[f"{t}.attention.output.dense.bias"]
            )
            x = ln(a + x, f"{t}.attention.output.LayerNorm")
            gu = x @ sd[f"{t}.mlp.gated_layers.weight"].T
            ff = gu.shape[1] // 2
            m = (F.gelu(gu[:, :ff]) * gu[:, ff:]) @ sd[f"{t}.mlp.wo.weight"].T + sd[f"{t}.mlp.wo.bias"]
            x = ln(m + x, f"{t}.mlp.layernorm")
        p = "cls.predictions"
        y = F.gelu(x @ sd[f"{p}.transform.dense.weight"].T + sd[f"{p}.transform.dense.bias"])
        y = ln(y, f"{p}.transform.LayerNorm", 1e-12)  # the authors fix the head's eps
        out[b, :n] = y @ sd[f"{p}.decoder.weight"].T + sd[f"{p}.decoder.bias"]
    return out


def test_mosaicbert_hub_imports_exactly(tmp_path):
    sd, cfg, src = _hub_folder(tmp_path)
    assert import_folder(src, tmp_path / "out") == ["layout mosaicbert-hub"]
    ours = MosaicBertForMaskedLM.from_pretrained(tmp_path / "out").eval()
    c = ours.config
    assert (c.vocab_size, c.position_embedding_type, c.mlp_type, c.head_layer_norm_eps) == (104, "alibi", "glu", 1e-12)
    batch = _batch(104)
    ref = _hub_reference(sd, cfg, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    with torch.no_grad():
        _close_at_real_tokens(ours(**batch).logits.double(), ref, batch["attention_mask"])


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
    sd, cfg, src = _hub_folder(tmp_path)
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
        _, _, src = _hub_folder(tmp_path)
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
    _, _, src = _hub_folder(tmp_path)
    import_folder(src, tmp_path / "a")
    with pytest.raises(UserError, match="hf-bert layout needs a bert-base-style model"):
        export_checkpoint(tmp_path / "a", tmp_path / "theirs", layout="hf-bert")
    assert not (tmp_path / "theirs").exists()


def test_glue_loader_imports_the_authors_layout_and_refuses_partial_weights(tmp_path):
    from mosaicbert_ds.glue.models import load_for_task, resolve_model_dir
    from mosaicbert_ds.glue.tasks import get_task
    from mosaicbert_ds.model import MosaicBertForSequenceClassification

    sd, cfg, src = _hub_folder(tmp_path)
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
