"""mosaicbert_ds: MosaicBERT pretraining on DeepSpeed.

Importing the package registers the model with transformers' Auto classes, so that
`AutoModelForMaskedLM.from_pretrained(dir)` loads a saved MosaicBERT without trust_remote_code,
and, in a source checkout that is not installed, makes the top-level kernels/ and benchmarks/
folders importable as mosaicbert_ds.kernels and mosaicbert_ds.benchmarks (source_checkout.py).
"""
# ruff: noqa: E402  (the stop-signal recorder is installed before the heavy imports)

from .train.stops import record_early  # stdlib only: runs before the heavy imports below

record_early()

from .source_checkout import map_source_folders  # stdlib only

map_source_folders()  # a checkout run without installing: mosaicbert_ds.kernels is kernels/

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from .attention import alibi_slopes, flash_attn_varlen_func, varlen_attention_reference
from .config import PRESETS, MosaicBertConfig
from .model import (
    MosaicBertForMaskedLM,
    MosaicBertForQuestionAnswering,
    MosaicBertForSequenceClassification,
    MosaicBertForTokenClassification,
    MosaicBertModel,
    MosaicBertPreTrainedModel,
)
from .padding import pad_output, unpad_input

__version__ = "0.1.0"

AutoConfig.register(MosaicBertConfig.model_type, MosaicBertConfig, exist_ok=True)
AutoModel.register(MosaicBertConfig, MosaicBertModel, exist_ok=True)
AutoModelForMaskedLM.register(MosaicBertConfig, MosaicBertForMaskedLM, exist_ok=True)
AutoModelForSequenceClassification.register(MosaicBertConfig, MosaicBertForSequenceClassification, exist_ok=True)
AutoModelForTokenClassification.register(MosaicBertConfig, MosaicBertForTokenClassification, exist_ok=True)
AutoModelForQuestionAnswering.register(MosaicBertConfig, MosaicBertForQuestionAnswering, exist_ok=True)

__all__ = [
    "MosaicBertConfig",
    "PRESETS",
    "MosaicBertModel",
    "MosaicBertForMaskedLM",
    "MosaicBertForSequenceClassification",
    "MosaicBertForTokenClassification",
    "MosaicBertForQuestionAnswering",
    "MosaicBertPreTrainedModel",
    "alibi_slopes",
    "flash_attn_varlen_func",
    "varlen_attention_reference",
    "unpad_input",
    "pad_output",
]
