"""The paper authors' MosaicBERT layout without their code: a state dict under their names and an
independent float64 forward pass, to check imports against."""

from __future__ import annotations

import json
import math

import torch
import torch.nn.functional as F
from safetensors.torch import save_file


def hub_folder(tmp_path, vocab=104, d=32, heads=4, ff=40, layers=2, eps=1e-6, std=0.2):
    """tmp_path/hub in the authors' layout (config.json, model.safetensors) with random weights:
    returns (state dict, config, folder)."""
    g = torch.Generator().manual_seed(11)
    r = lambda *s: torch.randn(*s, generator=g) * std  # noqa: E731
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


def authors_alibi_slopes(h: int) -> list[float]:
    """The slopes as the authors compute them: 2^(-8i/n) for a power of two n; otherwise those of
    the largest power of two below n, then every other slope of twice that many heads."""
    pow2 = lambda n: [2 ** (-8 * (i + 1) / n) for i in range(n)]  # noqa: E731
    if math.log2(h).is_integer():
        return pow2(h)
    c = 2 ** math.floor(math.log2(h))
    return pow2(c) + pow2(2 * c)[0::2][: h - c]


def hub_reference(sd, cfg, ids, mask, tt):
    """The authors' MosaicBERT forward, one sequence at a time (no padding), in float64."""
    d, h, eps = cfg["hidden_size"], cfg["num_attention_heads"], cfg["layer_norm_eps"]
    sd = {k: v.double() for k, v in sd.items()}
    ln = lambda x, p, e=eps: F.layer_norm(x, (d,), sd[p + ".weight"], sd[p + ".bias"], e)  # noqa: E731
    slopes = torch.tensor(authors_alibi_slopes(h), dtype=torch.float64)
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
