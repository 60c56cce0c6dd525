"""State-dict layouts: this project's names <-> transformers' BERT and the authors' MosaicBERT.

Every conversion is a renaming plus, for BERT, packing Q, K and V into one Wqkv (rows [q; k; v],
the order MosaicBertAttention unpacks). No value is changed, so logits match exactly.

Each layout knows
    detect(keys)              whether a state dict (with a `bert.` prefix) is in this layout
    config_to_ours(cfg)       MosaicBertConfig keyword arguments from the source's config.json
    to_ours(src, n_layers)    our state dict from theirs, consuming `src` (a KeyPool)
    config_from_ours(config)  a config.json for this layout
    from_ours(state, config)  their state dict from ours
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..config import MosaicBertConfig
from ..errors import UserError

Tensors = dict[str, torch.Tensor]

# Buffers some transformers versions saved; they carry no weights.
_IGNORED = ("bert.embeddings.position_ids", "bert.embeddings.token_type_ids")


class KeyPool:
    """A source state dict that is consumed key by key, so leftovers can be reported."""

    def __init__(self, state: Tensors, where: str) -> None:
        self.state = dict(state)
        self.where = where

    def take(self, key: str) -> torch.Tensor:
        if key not in self.state:
            raise UserError(f"{self.where}: missing weight {key!r}")
        return self.state.pop(key)

    def take_optional(self, key: str) -> torch.Tensor | None:
        return self.state.pop(key, None)

    def has(self, prefix: str) -> bool:
        return any(k.startswith(prefix) for k in self.state)

    def finish(self) -> None:
        for key in _IGNORED:
            self.state.pop(key, None)
        if self.state:
            rest = sorted(self.state)
            more = f" (and {len(rest) - 1} more)" if len(rest) > 1 else ""
            raise UserError(f"{self.where}: unexpected weight {rest[0]!r}{more}")


def _copy(out: Tensors, pool: KeyPool, pairs: list[tuple[str, str]]) -> None:
    for ours, theirs in pairs:
        out[ours] = pool.take(theirs)


def _ln(ours: str, theirs: str) -> list[tuple[str, str]]:
    return [(f"{ours}.weight", f"{theirs}.weight"), (f"{ours}.bias", f"{theirs}.bias")]


_lin = _ln  # a Linear has the same two names


def _embeddings(learned: bool) -> list[tuple[str, str]]:
    e = "bert.embeddings"
    pairs = [
        (f"{e}.word_embeddings.weight",) * 2,
        (f"{e}.token_type_embeddings.weight",) * 2,
        *_ln(f"{e}.LayerNorm", f"{e}.LayerNorm"),
    ]
    if learned:
        pairs.append((f"{e}.position_embeddings.weight",) * 2)
    return pairs


def _head_to_ours(out: Tensors, pool: KeyPool, notes: list[str]) -> None:
    """BERT's (and the authors') MLM head: transform.dense, act, transform.LayerNorm, tied decoder."""
    p = "cls.predictions"
    if not pool.has(p):
        notes.append("the source has no MLM head (a BertModel folder): the head was initialised")
        return
    _copy(out, pool, _lin("head.dense", f"{p}.transform.dense") + _ln("head.LayerNorm", f"{p}.transform.LayerNorm"))
    bias, dec_bias = pool.take_optional(f"{p}.bias"), pool.take_optional(f"{p}.decoder.bias")
    if bias is None and dec_bias is None:
        raise UserError(f"{pool.where}: missing weight '{p}.bias'")
    if bias is not None and dec_bias is not None and not torch.equal(bias, dec_bias):
        raise UserError(f"{pool.where}: {p}.bias and {p}.decoder.bias differ; only a shared bias is supported")
    out["head.bias"] = bias if bias is not None else dec_bias
    decoder = pool.take_optional(f"{p}.decoder.weight")
    wte = out["bert.embeddings.word_embeddings.weight"]
    if decoder is not None and not (decoder.shape == wte.shape and torch.equal(decoder, wte)):
        raise UserError(
            f"{pool.where}: {p}.decoder.weight is not tied to the word embeddings; only tied decoders are supported"
        )
    if pool.has("cls.seq_relationship."):
        pool.take("cls.seq_relationship.weight"), pool.take("cls.seq_relationship.bias")
        notes.append("the next-sentence-prediction head (cls.seq_relationship) was dropped")


def _head_from_ours(state: Tensors) -> Tensors:
    p = "cls.predictions"
    return {
        f"{p}.transform.dense.weight": state["head.dense.weight"],
        f"{p}.transform.dense.bias": state["head.dense.bias"],
        f"{p}.transform.LayerNorm.weight": state["head.LayerNorm.weight"],
        f"{p}.transform.LayerNorm.bias": state["head.LayerNorm.bias"],
        f"{p}.bias": state["head.bias"],
        f"{p}.decoder.bias": state["head.bias"],
        f"{p}.decoder.weight": state["bert.embeddings.word_embeddings.weight"],
    }


def _pooler_to_ours(out: Tensors, pool: KeyPool) -> None:
    if pool.has("bert.pooler."):
        _copy(out, pool, _lin("bert.pooler", "bert.pooler.dense"))


def _rename(state: Tensors, pairs: list[tuple[str, str]]) -> Tensors:
    return {theirs: state[ours] for ours, theirs in pairs if ours in state}


def _common_config(cfg: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "hidden_dropout_prob",
        "attention_probs_dropout_prob",
        "max_position_embeddings",
        "type_vocab_size",
        "initializer_range",
        "layer_norm_eps",
        "pad_token_id",
    )
    return {k: cfg[k] for k in keys if cfg.get(k) is not None}


def _hf_config(config: MosaicBertConfig, **extra: Any) -> dict[str, Any]:
    d = {"architectures": ["BertForMaskedLM"], "model_type": "bert"}
    d.update(
        {
            k: getattr(config, k)
            for k in (
                "vocab_size",
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "intermediate_size",
                "hidden_act",
                "hidden_dropout_prob",
                "attention_probs_dropout_prob",
                "max_position_embeddings",
                "type_vocab_size",
                "initializer_range",
                "layer_norm_eps",
                "pad_token_id",
            )
        }
    )
    d["position_embedding_type"] = "absolute"
    d.update(extra)
    return d


class HFBert:
    """transformers' BERT: separate query/key/value, GELU MLP, learned positions."""

    name = "hf-bert"
    _ACTS = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh"}

    @staticmethod
    def detect(keys: set[str]) -> bool:
        return "bert.encoder.layer.0.attention.self.query.weight" in keys

    def config_to_ours(self, cfg: dict[str, Any]) -> dict[str, Any]:
        if cfg.get("position_embedding_type", "absolute") != "absolute":
            raise UserError(
                f"BERT with position_embedding_type {cfg['position_embedding_type']!r} is not "
                f"supported (only 'absolute')"
            )
        act = cfg.get("hidden_act", "gelu")
        if act not in self._ACTS:
            raise UserError(f"BERT with hidden_act {act!r} is not supported (only {sorted(self._ACTS)})")
        return {
            **_common_config(cfg),
            "hidden_act": self._ACTS[act],
            "position_embedding_type": "learned",
            "mlp_type": "gelu",
            "unpad": False,
            "low_precision_layernorm": False,
            "pad_vocab_size_multiple": 1,
        }

    @staticmethod
    def _layer_pairs(i: int) -> list[tuple[str, str]]:
        o, t = f"bert.layers.{i}", f"bert.encoder.layer.{i}"
        return (
            _lin(f"{o}.attention.out_proj", f"{t}.attention.output.dense")
            + _ln(f"{o}.attention.LayerNorm", f"{t}.attention.output.LayerNorm")
            + _lin(f"{o}.mlp.Wi", f"{t}.intermediate.dense")
            + _lin(f"{o}.mlp.Wo", f"{t}.output.dense")
            + _ln(f"{o}.mlp.LayerNorm", f"{t}.output.LayerNorm")
        )

    def to_ours(self, pool: KeyPool, n_layers: int, notes: list[str]) -> Tensors:
        out: Tensors = {}
        _copy(out, pool, _embeddings(learned=True))
        for i in range(n_layers):
            t = f"bert.encoder.layer.{i}.attention.self"
            for part in ("weight", "bias"):
                q, k, v = (pool.take(f"{t}.{name}.{part}") for name in ("query", "key", "value"))
                if not q.shape == k.shape == v.shape:
                    raise UserError(f"{pool.where}: {t}.query/key/value.{part} have different shapes")
                out[f"bert.layers.{i}.attention.Wqkv.{part}"] = torch.cat([q, k, v], dim=0)
            _copy(out, pool, self._layer_pairs(i))
        _pooler_to_ours(out, pool)
        _head_to_ours(out, pool, notes)
        return out

    def check_exportable(self, config: MosaicBertConfig) -> None:
        if config.position_embedding_type != "learned" or config.mlp_type != "gelu":
            raise UserError(
                "the hf-bert layout needs a bert-base-style model (learned positions, GELU MLP); "
                f"this one has position_embedding_type={config.position_embedding_type!r}, "
                f"mlp_type={config.mlp_type!r}"
            )
        if config.head_layer_norm_eps not in (None, config.layer_norm_eps):
            raise UserError("the hf-bert layout has one layer_norm_eps; this model's head uses another")

    def config_from_ours(self, config: MosaicBertConfig) -> dict[str, Any]:
        self.check_exportable(config)
        act = {v: k for k, v in self._ACTS.items()}[config.hidden_act]
        return {**_hf_config(config), "hidden_act": act}

    def from_ours(self, state: Tensors, config: MosaicBertConfig) -> Tensors:
        self.check_exportable(config)
        out = _rename(state, _embeddings(learned=True))
        for i in range(config.num_hidden_layers):
            t = f"bert.encoder.layer.{i}.attention.self"
            for part in ("weight", "bias"):
                q, k, v = state[f"bert.layers.{i}.attention.Wqkv.{part}"].chunk(3, dim=0)
                out.update({f"{t}.query.{part}": q, f"{t}.key.{part}": k, f"{t}.value.{part}": v})
            out.update(_rename(state, self._layer_pairs(i)))
        out.update(_rename(state, _lin("bert.pooler", "bert.pooler.dense")))
        out.update(_head_from_ours(state))
        return out


class MosaicBertHub:
    """The paper authors' MosaicBERT: packed Wqkv, GeGLU `gated_layers`, ALiBi, no position embeddings.

    Details not visible in the names: the vocabulary is padded to a multiple of 8 (kept as is),
    the MLM head's LayerNorm eps is fixed at 1e-12, the GLU is always exact GELU, and the config
    says position_embedding_type "absolute" although attention uses ALiBi.
    """

    name = "mosaicbert-hub"
    HEAD_EPS = 1e-12

    @staticmethod
    def detect(keys: set[str]) -> bool:
        return "bert.encoder.layer.0.attention.self.Wqkv.weight" in keys

    def config_to_ours(self, cfg: dict[str, Any]) -> dict[str, Any]:
        act = cfg.get("hidden_act", "gelu")
        if act != "gelu":
            raise UserError(f"MosaicBERT with hidden_act {act!r} is not supported (only 'gelu')")
        kw = {
            **_common_config(cfg),
            "hidden_act": "gelu",
            "position_embedding_type": "alibi",
            "mlp_type": "glu",
            "glu_fused": True,
            "unpad": True,
            "low_precision_layernorm": True,
        }
        vocab = int(kw.get("vocab_size", 30522))
        kw["pad_vocab_size_multiple"] = 8 if vocab % 8 == 0 else 1  # keeps the source's vocab_size exactly
        eps = float(kw.get("layer_norm_eps", 1e-12))
        kw["head_layer_norm_eps"] = None if eps == self.HEAD_EPS else self.HEAD_EPS
        return kw

    @staticmethod
    def _layer_pairs(i: int) -> list[tuple[str, str]]:
        o, t = f"bert.layers.{i}", f"bert.encoder.layer.{i}"
        return (
            _lin(f"{o}.attention.Wqkv", f"{t}.attention.self.Wqkv")
            + _lin(f"{o}.attention.out_proj", f"{t}.attention.output.dense")
            + _ln(f"{o}.attention.LayerNorm", f"{t}.attention.output.LayerNorm")
            + [(f"{o}.mlp.Wi.weight", f"{t}.mlp.gated_layers.weight")]
            + _lin(f"{o}.mlp.Wo", f"{t}.mlp.wo")
            + _ln(f"{o}.mlp.LayerNorm", f"{t}.mlp.layernorm")
        )

    def to_ours(self, pool: KeyPool, n_layers: int, notes: list[str]) -> Tensors:
        out: Tensors = {}
        _copy(out, pool, _embeddings(learned=False))
        for i in range(n_layers):
            _copy(out, pool, self._layer_pairs(i))
        _pooler_to_ours(out, pool)
        _head_to_ours(out, pool, notes)
        return out

    def check_exportable(self, config: MosaicBertConfig) -> None:
        if config.position_embedding_type != "alibi" or config.mlp_type != "glu" or config.hidden_act != "gelu":
            raise UserError(
                "the mosaicbert-hub layout needs a MosaicBERT-style model (ALiBi, GeGLU, exact GELU); "
                f"this one has position_embedding_type={config.position_embedding_type!r}, "
                f"mlp_type={config.mlp_type!r}, hidden_act={config.hidden_act!r}"
            )
        head_eps = config.layer_norm_eps if config.head_layer_norm_eps is None else config.head_layer_norm_eps
        if head_eps != self.HEAD_EPS:
            raise UserError(
                f"the mosaicbert-hub layout fixes the head's LayerNorm eps at 1e-12; this model uses {head_eps}"
            )

    def config_from_ours(self, config: MosaicBertConfig) -> dict[str, Any]:
        self.check_exportable(config)
        return _hf_config(config, alibi_starting_size=config.max_position_embeddings)

    def from_ours(self, state: Tensors, config: MosaicBertConfig) -> Tensors:
        self.check_exportable(config)
        state = dict(state)
        for i in range(config.num_hidden_layers):
            m = f"bert.layers.{i}.mlp"
            if f"{m}.Wi_gate.weight" in state:  # glu_fused=False keeps the halves apart
                state[f"{m}.Wi.weight"] = torch.cat([state.pop(f"{m}.Wi_gate.weight"), state.pop(f"{m}.Wi_up.weight")])
        out = _rename(state, _embeddings(learned=False))
        for i in range(config.num_hidden_layers):
            out.update(_rename(state, self._layer_pairs(i)))
        out.update(_rename(state, _lin("bert.pooler", "bert.pooler.dense")))
        out.update(_head_from_ours(state))
        return out


LAYOUTS: dict[str, Any] = {"hf-bert": HFBert(), "mosaicbert-hub": MosaicBertHub()}
"""Foreign layouts by name: these import, and export with `mosaicbert-ds export --layout NAME`."""

Detector = Callable[[set[str]], bool]
