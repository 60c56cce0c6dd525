"""MosaicBertConfig: the architecture as data, with the paper's sizes as named presets.

Every MosaicBERT change over BERT is a switch here, so the paper's Figure 4 ablations are
config overrides of one model class:

    position_embedding_type  "alibi" | "learned"      (ALiBi vs BERT's learned positions)
    mlp_type                 "glu" | "gelu"           (GeGLU vs BERT's GELU MLP)
    glu_fused                True | False             (one d->2ff matmul, or two d->ff)
    unpad                    True | False             (packed token stream vs padded batch)
    low_precision_layernorm  True | False             (bf16 LayerNorm under autocast)
    attention_probs_dropout_prob                      (0 for the flash kernel)
    pad_vocab_size_multiple  64 | 1                   (vocabulary rounded up for the tensor cores)
"""

from __future__ import annotations

import math
from typing import Any

from transformers import PretrainedConfig

# Sizes from the paper: Portes et al., "MosaicBERT: A Bidirectional Encoder Optimized for Fast
# Pretraining", NeurIPS 2023, Section 2.1 (BERT-Base and -Large, whose sizes MosaicBERT keeps).
# "tiny" is for tests and CPU smoke runs.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=128, vocab_size=1024),
    "base": dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072),
    "large": dict(num_hidden_layers=24, hidden_size=1024, num_attention_heads=16, intermediate_size=4096),
}

BERT_BASELINE: dict[str, Any] = dict(
    vocab_size=30522,
    pad_vocab_size_multiple=1,
    position_embedding_type="learned",
    mlp_type="gelu",
    unpad=False,
    low_precision_layernorm=False,
    attention_probs_dropout_prob=0.1,
)
"""The paper's BERT baseline (Figure 4's caption): BERT's own architecture and padded execution,
as in Hugging Face's BERT. `bert-base` and `bert-large` are `base` and `large` with these switches."""

PRESETS["bert-base"] = {**PRESETS["base"], **BERT_BASELINE}
PRESETS["bert-large"] = {**PRESETS["large"], **BERT_BASELINE}

_ATTENTION_IMPLS = ("auto", "triton", "torch")

RUNTIME_KEYS = ("attention_impl", "fused_ops")
"""Config keys chosen where the model runs; they are not part of a saved architecture."""

ARCHITECTURE_KEYS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "position_embedding_type",
    "mlp_type",
    "max_position_embeddings",
    "type_vocab_size",
    "hidden_act",
    "layer_norm_eps",
    "head_layer_norm_eps",
)
"""Keys that fix the shapes and the function of the weights (what `model.init_from` takes from its source)."""


class MosaicBertConfig(PretrainedConfig):
    """Configuration of a MosaicBERT (or BERT-baseline) encoder.

    Args beyond BERT's usual ones:
        position_embedding_type: "alibi" (no position embeddings; linear biases in attention)
            or "learned" (BERT's absolute position embeddings, up to max_position_embeddings).
        mlp_type: "glu" (GeGLU: Wi d->2*ff without bias, GELU(gate) * up, Wo ff->d) or "gelu".
        glu_fused: compute the GLU's two halves with one matmul (True) or two (False).
        unpad: run every layer on the packed stream of real tokens (True) or on the padded
            (batch, seq, hidden) tensor with a masked attention bias (False).
        low_precision_layernorm: under bf16/fp16 autocast, run LayerNorm in that dtype instead
            of upcasting to fp32.
        pad_vocab_size_multiple: round vocab_size up to this multiple (64 in the paper).
        attention_impl: "auto" (Triton kernel on CUDA, PyTorch reference elsewhere), "triton"
            or "torch".
        fused_ops: use the fused Triton elementwise kernels (GeGLU, residual + LayerNorm) where
            a CUDA device and Triton are present.
        head_layer_norm_eps: the MLM head's LayerNorm eps when it differs from layer_norm_eps
            (the authors' MosaicBERT fixes it at 1e-12); None means layer_norm_eps.

    attention_impl and fused_ops are choices of the machine the model runs on, not of the
    architecture (RUNTIME_KEYS): exported configs leave them out.
    """

    model_type = "mosaicbert"

    def __init__(
        self,
        vocab_size: int = 30528,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        intermediate_size: int = 3072,
        hidden_act: str = "gelu",
        hidden_dropout_prob: float = 0.1,
        attention_probs_dropout_prob: float = 0.0,
        max_position_embeddings: int = 512,
        type_vocab_size: int = 2,
        initializer_range: float = 0.02,
        layer_norm_eps: float = 1e-12,
        pad_token_id: int = 0,
        position_embedding_type: str = "alibi",
        mlp_type: str = "glu",
        glu_fused: bool = True,
        unpad: bool = True,
        low_precision_layernorm: bool = True,
        pad_vocab_size_multiple: int = 64,
        attention_impl: str = "auto",
        fused_ops: bool = True,
        classifier_dropout: float | None = None,
        head_layer_norm_eps: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(pad_token_id=pad_token_id, **kwargs)
        self.pad_vocab_size_multiple = int(pad_vocab_size_multiple)
        if self.pad_vocab_size_multiple < 1:
            raise ValueError(f"pad_vocab_size_multiple must be >= 1, got {pad_vocab_size_multiple}")
        self.vocab_size = int(math.ceil(vocab_size / self.pad_vocab_size_multiple) * self.pad_vocab_size_multiple)
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.max_position_embeddings = max_position_embeddings
        self.type_vocab_size = type_vocab_size
        self.initializer_range = initializer_range
        self.layer_norm_eps = layer_norm_eps
        self.position_embedding_type = position_embedding_type
        self.mlp_type = mlp_type
        self.glu_fused = bool(glu_fused)
        self.unpad = bool(unpad)
        self.low_precision_layernorm = bool(low_precision_layernorm)
        self.attention_impl = attention_impl
        self.fused_ops = bool(fused_ops)
        self.classifier_dropout = classifier_dropout
        self.head_layer_norm_eps = head_layer_norm_eps
        self.validate()

    def validate(self) -> None:
        """Raise ValueError with one clear sentence for an inconsistent configuration."""
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "type_vocab_size",
        ):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must divide hidden_size ({self.hidden_size})"
            )
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            p = getattr(self, name)
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {p}")
        if self.classifier_dropout is not None and not 0.0 <= self.classifier_dropout < 1.0:
            raise ValueError(f"classifier_dropout must be in [0, 1), got {self.classifier_dropout}")
        if self.position_embedding_type not in ("alibi", "learned"):
            raise ValueError(
                f"position_embedding_type must be 'alibi' or 'learned', got {self.position_embedding_type!r}"
            )
        if self.mlp_type not in ("glu", "gelu"):
            raise ValueError(f"mlp_type must be 'glu' or 'gelu', got {self.mlp_type!r}")
        if self.attention_impl not in _ATTENTION_IMPLS:
            raise ValueError(f"attention_impl must be one of {_ATTENTION_IMPLS}, got {self.attention_impl!r}")
        if self.hidden_act not in ("gelu", "gelu_tanh"):
            raise ValueError(f"hidden_act must be 'gelu' or 'gelu_tanh', got {self.hidden_act!r}")
        if self.layer_norm_eps <= 0:
            raise ValueError(f"layer_norm_eps must be positive, got {self.layer_norm_eps}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> MosaicBertConfig:
        """A preset by name ("tiny", "base", "large", "bert-base", "bert-large") with overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        unknown = set(overrides) - set(cls().to_dict()) - {"num_labels", "problem_type", "id2label", "label2id"}
        if unknown:
            raise ValueError(f"unknown model config key(s) {sorted(unknown)} for preset {name!r}")
        return cls(**{**PRESETS[name], **overrides})
