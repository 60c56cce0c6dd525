"""MosaicBERT: a post-LayerNorm BERT encoder that runs on the packed stream of real tokens.

The encoder takes either a padded batch (input_ids (B, L), attention_mask (B, L)) or an
unpadded one (input_ids (T,), cu_seqlens (B + 1,), max_seqlen), which is what the data
collator produces. With config.unpad the padding is removed once, before the embeddings, and
every layer (attention included, through flash_attn_varlen_func with cu_seqlens) works on
(T, hidden). With unpad=False (the BERT baseline and the ablation) the layers run on the padded
(B, L, hidden) tensor with an additive attention mask.

With labels, MosaicBertForMaskedLM runs its head only on the masked tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.modeling_outputs import (BaseModelOutputWithPooling, MaskedLMOutput,
                                           SequenceClassifierOutput)

from .attention import alibi_bias, alibi_slopes, flash_attn_varlen_func, padded_attention
from .batch import IGNORE_INDEX
from .config import MosaicBertConfig
from .ops import LayerNorm, ResidualSplit, cross_entropy, gelu, geglu, linear_dropout_add_layer_norm
from .padding import pad_output, positions_from_cu_seqlens, unpad_input


@dataclass
class Packing:
    """How the current batch is laid out, handed to every layer.

    Packed: hidden is (T, d) and attention uses cu_seqlens/max_seqlen.
    Padded: hidden is (B, L, d) and attention uses `bias` (B or 1, H, L, L).
    """

    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int = 0
    bias: torch.Tensor | None = None

    @property
    def packed(self) -> bool:
        return self.cu_seqlens is not None


class MosaicBertEmbeddings(nn.Module):
    """Word + token-type (+ learned position, for the BERT baseline) embeddings, LayerNorm, dropout."""

    def __init__(self, config: MosaicBertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.position_embeddings = (nn.Embedding(config.max_position_embeddings, config.hidden_size)
                                    if config.position_embedding_type == "learned" else None)
        self.LayerNorm = LayerNorm(config.hidden_size, config.layer_norm_eps, config.low_precision_layernorm)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None,
                position_ids: torch.Tensor | None) -> torch.Tensor:
        x = self.word_embeddings(input_ids)
        if token_type_ids is None:
            x = x + self.token_type_embeddings.weight[0]
        else:
            x = x + self.token_type_embeddings(token_type_ids)
        if self.position_embeddings is not None:
            x = x + self.position_embeddings(position_ids)
        return self.dropout(self.LayerNorm(x))


class MosaicBertAttention(nn.Module):
    """Fused QKV projection, ALiBi attention on the packed stream, output projection, post-LN."""

    def __init__(self, config: MosaicBertConfig) -> None:
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.attn_dropout = config.attention_probs_dropout_prob
        self.hidden_dropout = config.hidden_dropout_prob
        self.impl = config.attention_impl
        self.fused = config.fused_ops
        self.Wqkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = LayerNorm(config.hidden_size, config.layer_norm_eps, config.low_precision_layernorm)
        if config.position_embedding_type == "alibi":
            self.register_buffer("alibi_slopes", alibi_slopes(self.n_heads), persistent=False)
        else:
            self.alibi_slopes = None

    def forward(self, x: torch.Tensor, packing: Packing) -> torch.Tensor:
        split = ResidualSplit(x, self.fused)
        qkv = split.linear(self.Wqkv).unflatten(-1, (3, self.n_heads, self.head_dim))
        q, k, v = qkv.unbind(dim=-3)
        dropout_p = self.attn_dropout if self.training else 0.0
        if packing.packed:
            o = flash_attn_varlen_func(q, k, v, packing.cu_seqlens, packing.cu_seqlens, packing.max_seqlen,
                                       packing.max_seqlen, dropout_p=dropout_p, alibi_slopes=self.alibi_slopes,
                                       impl=self.impl)
        else:
            o = padded_attention(q, k, v, packing.bias, dropout_p=dropout_p)
        return linear_dropout_add_layer_norm(o.flatten(-2), self.out_proj, x, self.LayerNorm, self.hidden_dropout,
                                             self.training, self.fused, split.sink)


class MosaicBertMLP(nn.Module):
    """GeGLU (mlp_type="glu") or BERT's GELU MLP, followed by residual and post-LN."""

    def __init__(self, config: MosaicBertConfig) -> None:
        super().__init__()
        self.glu = config.mlp_type == "glu"
        self.fused_glu = config.glu_fused
        self.act = config.hidden_act
        self.fused = config.fused_ops
        d, ff = config.hidden_size, config.intermediate_size
        if not self.glu:
            self.Wi = nn.Linear(d, ff)
        elif self.fused_glu:
            self.Wi = nn.Linear(d, 2 * ff, bias=False)  # [gate; up] in one matmul
        else:
            self.Wi_gate = nn.Linear(d, ff, bias=False)
            self.Wi_up = nn.Linear(d, ff, bias=False)
        self.Wo = nn.Linear(ff, d)
        self.dropout_p = config.hidden_dropout_prob
        self.LayerNorm = LayerNorm(d, config.layer_norm_eps, config.low_precision_layernorm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # MosaicBERT drops out the GLU output before Wo (fused into the GeGLU kernel); BERT after Wo
        split = ResidualSplit(x, self.fused and (not self.glu or self.fused_glu))
        if not self.glu:
            h = gelu(split.linear(self.Wi), self.act)
        elif self.fused_glu:
            h = geglu(split.linear(self.Wi), self.act, fused=self.fused, p=self.dropout_p, training=self.training)
        else:
            h = F.dropout(gelu(self.Wi_gate(x), self.act) * self.Wi_up(x), p=self.dropout_p, training=self.training)
        p_after = 0.0 if self.glu else self.dropout_p
        return linear_dropout_add_layer_norm(h, self.Wo, x, self.LayerNorm, p_after, self.training, self.fused,
                                             split.sink)


class MosaicBertLayer(nn.Module):
    def __init__(self, config: MosaicBertConfig) -> None:
        super().__init__()
        self.attention = MosaicBertAttention(config)
        self.mlp = MosaicBertMLP(config)

    def forward(self, x: torch.Tensor, packing: Packing) -> torch.Tensor:
        return self.mlp(self.attention(x, packing))


class MosaicBertPreTrainedModel(PreTrainedModel):
    config_class = MosaicBertConfig
    base_model_prefix = "bert"
    supports_gradient_checkpointing = False
    _no_split_modules = ["MosaicBertLayer"]

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, MosaicBertLMHead):
            nn.init.zeros_(module.bias)


@dataclass
class Encoded:
    """Encoder output before any re-padding.

    hidden is (N, d). `gather` maps the caller's flattened input positions onto hidden's rows:
    None when hidden is already aligned with the flattened input (packed input, or padded
    input run padded), otherwise the (N,) indices of the real tokens in the flattened (B*L) input.
    """

    hidden: torch.Tensor
    gather: torch.Tensor | None
    cu_seqlens: torch.Tensor | None
    padded_shape: tuple[int, int] | None


class MosaicBertModel(MosaicBertPreTrainedModel):
    """The encoder. Padded input gives padded output; unpadded input gives (T, d) output."""

    def __init__(self, config: MosaicBertConfig, add_pooling_layer: bool = True) -> None:
        super().__init__(config)
        self.embeddings = MosaicBertEmbeddings(config)
        self.layers = nn.ModuleList([MosaicBertLayer(config) for _ in range(config.num_hidden_layers)])
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size) if add_pooling_layer else None
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings.word_embeddings = value

    def _padded_bias(self, attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Additive (B, H or 1, L, L) bias: -inf-like at padded keys, plus ALiBi when used."""
        neg = torch.finfo(dtype).min
        bias = (1.0 - attention_mask[:, None, None, :].to(dtype)) * neg
        slopes = self.layers[0].attention.alibi_slopes
        if slopes is not None:
            bias = bias + alibi_bias(slopes, attention_mask.shape[1]).to(dtype)[None]
        return bias

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               token_type_ids: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
               max_seqlen: int | None = None) -> Encoded:
        """Run embeddings and layers; see `Encoded` for the layout of the result."""
        if cu_seqlens is not None:  # already unpadded
            if input_ids.dim() != 1:
                raise ValueError("with cu_seqlens, input_ids must be the flat (total_tokens,) stream")
            if max_seqlen is None:
                max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max().item())
            total = input_ids.shape[0]
            positions = (positions_from_cu_seqlens(cu_seqlens, total)
                         if self.embeddings.position_embeddings is not None or not self.config.unpad else None)
            x = self.embeddings(input_ids, token_type_ids, positions)
            if self.config.unpad:
                return Encoded(self._run(x, Packing(cu_seqlens, max_seqlen)), None, cu_seqlens, None)
            # unpad=False ablation on a packed batch: pad once, run padded, repack.
            batch = cu_seqlens.shape[0] - 1
            seq_idx = torch.repeat_interleave(torch.arange(batch, device=x.device),
                                              (cu_seqlens[1:] - cu_seqlens[:-1]).long(), output_size=total)
            idx = seq_idx * max_seqlen + positions
            mask = torch.zeros(batch * max_seqlen, dtype=torch.long, device=x.device)
            mask[idx] = 1
            mask = mask.view(batch, max_seqlen)
            h = self._run(pad_output(x, idx, batch, max_seqlen), Packing(bias=self._padded_bias(mask, x.dtype)))
            return Encoded(h.flatten(0, 1)[idx], None, cu_seqlens, None)

        if input_ids.dim() != 2:
            raise ValueError("padded input_ids must be (batch, seq_len); pass cu_seqlens for a flat batch")
        batch, seqlen = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if self.config.unpad:
            ids, gather, cu, max_len = unpad_input(input_ids[..., None], attention_mask)
            tt = token_type_ids.reshape(-1)[gather] if token_type_ids is not None else None
            positions = (positions_from_cu_seqlens(cu, ids.shape[0])
                         if self.embeddings.position_embeddings is not None else None)
            x = self.embeddings(ids[:, 0], tt, positions)
            return Encoded(self._run(x, Packing(cu, max_len)), gather, cu, (batch, seqlen))
        positions = torch.arange(seqlen, device=input_ids.device).expand(batch, -1)
        x = self.embeddings(input_ids, token_type_ids, positions)
        h = self._run(x, Packing(bias=self._padded_bias(attention_mask, x.dtype)))
        return Encoded(h.flatten(0, 1), None, None, (batch, seqlen))

    def _run(self, x: torch.Tensor, packing: Packing) -> torch.Tensor:
        if packing.bias is not None and torch.is_autocast_enabled(x.device.type):
            packing.bias = packing.bias.to(torch.get_autocast_dtype(x.device.type))
        for layer in self.layers:
            x = layer(x, packing)
        return x

    def pool(self, enc: Encoded) -> torch.Tensor:
        """tanh(W h_first) of each sequence's first token, (B, d)."""
        if enc.cu_seqlens is not None:  # packed rows: each sequence starts at cu_seqlens[i]
            first = enc.hidden[enc.cu_seqlens[:-1].long()]
        else:
            first = enc.hidden.view(*enc.padded_shape, -1)[:, 0]
        return torch.tanh(self.pooler(first))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                max_seqlen: int | None = None, return_dict: bool | None = None, **_: object
                ) -> BaseModelOutputWithPooling:
        enc = self.encode(input_ids, attention_mask, token_type_ids, cu_seqlens, max_seqlen)
        hidden = enc.hidden
        if enc.padded_shape is not None:  # padded input: padded output, re-padded once here
            b, l = enc.padded_shape
            hidden = pad_output(hidden, enc.gather, b, l) if enc.gather is not None else hidden.view(b, l, -1)
        pooled = self.pool(enc) if self.pooler is not None else None
        return BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=pooled)


class MosaicBertLMHead(nn.Module):
    """Dense, GELU, LayerNorm, then a decoder tied to the word embeddings plus its own bias."""

    def __init__(self, config: MosaicBertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = config.hidden_act
        self.LayerNorm = LayerNorm(config.hidden_size, config.layer_norm_eps, config.low_precision_layernorm)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, h: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        h = self.LayerNorm(gelu(self.dense(h), self.act))
        return F.linear(h, word_embeddings, self.bias)


@dataclass
class MosaicBertMaskedLMOutput(MaskedLMOutput):
    """With labels, `logits` covers only the masked tokens (M, V) and `masked_labels` is (M,)."""

    masked_labels: torch.Tensor | None = None


class MosaicBertForMaskedLM(MosaicBertPreTrainedModel):
    def __init__(self, config: MosaicBertConfig) -> None:
        super().__init__(config)
        self.bert = MosaicBertModel(config, add_pooling_layer=False)
        self.head = MosaicBertLMHead(config)
        self.post_init()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None,
                masked_positions: torch.Tensor | None = None, return_dict: bool | None = None, **_: object
                ) -> MosaicBertMaskedLMOutput:
        """Takes a mosaicbert_ds.batch.PackedBatch or PaddedBatch as keyword arguments (shapes
        there). labels: IGNORE_INDEX where not masked, same shape as input_ids. masked_positions:
        optional (M,) indices of the masked tokens in the flattened input (T for a packed batch,
        B * L for a padded one), which saves a host sync."""
        enc = self.bert.encode(input_ids, attention_mask, token_type_ids, cu_seqlens, max_seqlen)
        wte = self.bert.embeddings.word_embeddings.weight
        if labels is None:
            logits = self.head(enc.hidden, wte)
            if enc.padded_shape is not None:
                b, l = enc.padded_shape
                logits = pad_output(logits, enc.gather, b, l) if enc.gather is not None else logits.view(b, l, -1)
            return MosaicBertMaskedLMOutput(logits=logits)
        flat_labels = labels.reshape(-1)
        if enc.gather is not None:
            flat_labels = flat_labels[enc.gather]
        if masked_positions is None:
            masked_positions = torch.nonzero(flat_labels != IGNORE_INDEX, as_tuple=False).flatten()
        elif enc.gather is not None:  # positions in the padded (B * L) input -> rows of the packed stream
            mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
            masked_positions = (mask.flatten().cumsum(0) - 1)[masked_positions]
        masked_labels = flat_labels[masked_positions]
        logits = self.head(enc.hidden[masked_positions], wte)
        loss = cross_entropy(logits, masked_labels, fused=self.config.fused_ops)
        return MosaicBertMaskedLMOutput(loss=loss, logits=logits, masked_labels=masked_labels)


class MosaicBertForSequenceClassification(MosaicBertPreTrainedModel):
    """Pooled first token -> dropout -> linear. num_labels == 1 means regression (STS-B)."""

    def __init__(self, config: MosaicBertConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = MosaicBertModel(config, add_pooling_layer=True)
        p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(p)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None,
                return_dict: bool | None = None, **_: object) -> SequenceClassifierOutput:
        enc = self.bert.encode(input_ids, attention_mask, token_type_ids, cu_seqlens, max_seqlen)
        logits = self.classifier(self.dropout(self.bert.pool(enc)))
        loss = None
        if labels is not None:
            if self.config.problem_type is None:
                self.config.problem_type = ("regression" if self.num_labels == 1 else
                                            "single_label_classification")
            if self.config.problem_type == "regression":
                loss = F.mse_loss(logits.squeeze(-1).float(), labels.float())
            elif self.config.problem_type == "single_label_classification":
                loss = F.cross_entropy(logits.float(), labels.long())
            else:
                loss = F.binary_cross_entropy_with_logits(logits.float(), labels.float())
        return SequenceClassifierOutput(loss=loss, logits=logits)
