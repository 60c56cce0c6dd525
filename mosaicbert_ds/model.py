"""MosaicBERT: a post-LayerNorm BERT encoder that runs on the packed stream of real tokens.

The encoder takes either a padded batch (input_ids (B, L), attention_mask (B, L)) or an
unpadded one (input_ids (T,), cu_seqlens (B + 1,), max_seqlen), which is what the data
collator produces. With config.unpad the padding is removed once, before the embeddings, and
every layer (attention included, through flash_attn_varlen_func with cu_seqlens) works on
(T, hidden). With unpad=False (the BERT baseline and the ablation) the layers run on the padded
(B, L, hidden) tensor with an additive attention mask.

With labels, MosaicBertForMaskedLM runs its head only on the masked tokens.

Heads: MaskedLM, SequenceClassification, TokenClassification, QuestionAnswering. Every model
takes output_hidden_states (the embeddings' output and each layer's, laid out like
last_hidden_state) and supports gradient_checkpointing_enable().

This file, config.py, attention.py, ops.py and padding.py import nothing else of the package
(the Triton kernels are looked up by name at run time), so an exported folder carries copies of
them and loads with transformers alone (trust_remote_code=True).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.modeling_outputs import (
    BaseModelOutputWithPooling,
    MaskedLMOutput,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)

from .attention import alibi_bias, alibi_slopes, flash_attn_varlen_func, padded_attention
from .batch import IGNORE_INDEX
from .config import MosaicBertConfig
from .ops import LayerNorm, ResidualSplit, cross_entropy, geglu, gelu, linear_dropout_add_layer_norm
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
        self.position_embeddings = (
            nn.Embedding(config.max_position_embeddings, config.hidden_size)
            if config.position_embedding_type == "learned"
            else None
        )
        self.LayerNorm = LayerNorm(config.hidden_size, config.layer_norm_eps, config.low_precision_layernorm)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None, position_ids: torch.Tensor | None
    ) -> torch.Tensor:
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
            o = flash_attn_varlen_func(
                q,
                k,
                v,
                packing.cu_seqlens,
                packing.cu_seqlens,
                packing.max_seqlen,
                packing.max_seqlen,
                dropout_p=dropout_p,
                alibi_slopes=self.alibi_slopes,
                impl=self.impl,
            )
        else:
            o = padded_attention(q, k, v, packing.bias, dropout_p=dropout_p)
        return linear_dropout_add_layer_norm(
            o.flatten(-2), self.out_proj, x, self.LayerNorm, self.hidden_dropout, self.training, self.fused, split.sink
        )


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
        return linear_dropout_add_layer_norm(
            h, self.Wo, x, self.LayerNorm, p_after, self.training, self.fused, split.sink
        )


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
    supports_gradient_checkpointing = True
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
        elif isinstance(module, MosaicBertAttention) and module.alibi_slopes is not None:
            # a computed buffer: transformers 5 builds models on the meta device and fills
            # non-persistent buffers through this method
            with torch.no_grad():
                module.alibi_slopes.copy_(alibi_slopes(module.n_heads).to(module.alibi_slopes.device))


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
    all_hidden: list[torch.Tensor] | None = None  # with output_hidden_states: embeddings, then each layer

    def repad(self, h: torch.Tensor) -> torch.Tensor:
        """Rows like `hidden` laid out like the input: (B, L, ...) for padded input, as is otherwise."""
        if self.padded_shape is None:
            return h
        b, l = self.padded_shape
        return pad_output(h, self.gather, b, l) if self.gather is not None else h.view(b, l, *h.shape[1:])

    def hidden_states(self) -> tuple[torch.Tensor, ...] | None:
        if self.all_hidden is None:
            return None
        if self.padded_shape is not None and self.gather is None:  # padded run: (B*L, d) rows
            return tuple(self.repad(h.flatten(0, -2)) for h in self.all_hidden)
        return tuple(self.repad(h) for h in self.all_hidden)


class MosaicBertModel(MosaicBertPreTrainedModel):
    """The encoder. Padded input gives padded output; unpadded input gives (T, d) output."""

    def __init__(self, config: MosaicBertConfig, add_pooling_layer: bool = True) -> None:
        super().__init__(config)
        self.embeddings = MosaicBertEmbeddings(config)
        self.layers = nn.ModuleList([MosaicBertLayer(config) for _ in range(config.num_hidden_layers)])
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size) if add_pooling_layer else None
        self.gradient_checkpointing = False  # set by gradient_checkpointing_enable()
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

    def encode(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        output_hidden_states: bool | None = None,
    ) -> Encoded:
        """Run embeddings and layers; see `Encoded` for the layout of the result.
        output_hidden_states None: the config's choice."""
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        keep: list[torch.Tensor] | None = [] if output_hidden_states else None
        if cu_seqlens is not None:
            return self._encode_packed(input_ids, token_type_ids, cu_seqlens, max_seqlen, keep)
        return self._encode_padded(input_ids, attention_mask, token_type_ids, keep)

    def _encode_packed(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None,
        cu_seqlens: torch.Tensor,
        max_seqlen: int | None,
        keep: list[torch.Tensor] | None,
    ) -> Encoded:
        """An already unpadded batch: input_ids (T,), cu_seqlens (B + 1,)."""
        if input_ids.dim() != 1:
            raise ValueError("with cu_seqlens, input_ids must be the flat (total_tokens,) stream")
        if max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max().item())
        total = input_ids.shape[0]
        positions = (
            positions_from_cu_seqlens(cu_seqlens, total)
            if self.embeddings.position_embeddings is not None or not self.config.unpad
            else None
        )
        x = self.embeddings(input_ids, token_type_ids, positions)
        if self.config.unpad:
            return Encoded(self._run(x, Packing(cu_seqlens, max_seqlen), keep), None, cu_seqlens, None, keep)
        # unpad=False ablation on a packed batch: pad once, run padded, repack.
        batch = cu_seqlens.shape[0] - 1
        seq_idx = torch.repeat_interleave(
            torch.arange(batch, device=x.device), (cu_seqlens[1:] - cu_seqlens[:-1]).long(), output_size=total
        )
        idx = seq_idx * max_seqlen + positions
        mask = torch.zeros(batch * max_seqlen, dtype=torch.long, device=x.device)
        mask[idx] = 1
        mask = mask.view(batch, max_seqlen)
        h = self._run(pad_output(x, idx, batch, max_seqlen), Packing(bias=self._padded_bias(mask, x.dtype)), keep)
        if keep is not None:
            keep[:] = [t.flatten(0, 1)[idx] for t in keep]
        return Encoded(h.flatten(0, 1)[idx], None, cu_seqlens, None, keep)

    def _encode_padded(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        token_type_ids: torch.Tensor | None,
        keep: list[torch.Tensor] | None,
    ) -> Encoded:
        """A padded batch: input_ids (B, L), unpadded once here when config.unpad."""
        if input_ids.dim() != 2:
            raise ValueError("padded input_ids must be (batch, seq_len); pass cu_seqlens for a flat batch")
        batch, seqlen = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if self.config.unpad:
            ids, gather, cu, max_len = unpad_input(input_ids[..., None], attention_mask)
            tt = token_type_ids.reshape(-1)[gather] if token_type_ids is not None else None
            positions = (
                positions_from_cu_seqlens(cu, ids.shape[0]) if self.embeddings.position_embeddings is not None else None
            )
            x = self.embeddings(ids[:, 0], tt, positions)
            return Encoded(self._run(x, Packing(cu, max_len), keep), gather, cu, (batch, seqlen), keep)
        positions = torch.arange(seqlen, device=input_ids.device).expand(batch, -1)
        x = self.embeddings(input_ids, token_type_ids, positions)
        h = self._run(x, Packing(bias=self._padded_bias(attention_mask, x.dtype)), keep)
        return Encoded(h.flatten(0, 1), None, None, (batch, seqlen), keep)

    def _run(self, x: torch.Tensor, packing: Packing, keep: list[torch.Tensor] | None = None) -> torch.Tensor:
        if packing.bias is not None and torch.is_autocast_enabled(x.device.type):
            packing.bias = packing.bias.to(torch.get_autocast_dtype(x.device.type))
        if keep is not None:
            keep.append(x)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = self._gradient_checkpointing_func(layer.__call__, x, packing)
            else:
                x = layer(x, packing)
            if keep is not None:
                keep.append(x)
        return x

    def pool(self, enc: Encoded) -> torch.Tensor:
        """tanh(W h_first) of each sequence's first token, (B, d)."""
        if enc.cu_seqlens is not None:  # packed rows: each sequence starts at cu_seqlens[i]
            first = enc.hidden[enc.cu_seqlens[:-1].long()]
        else:
            first = enc.hidden.view(*enc.padded_shape, -1)[:, 0]
        return torch.tanh(self.pooler(first))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **_: object,
    ) -> BaseModelOutputWithPooling:
        enc = self.encode(input_ids, attention_mask, token_type_ids, cu_seqlens, max_seqlen, output_hidden_states)
        hidden = enc.repad(enc.hidden)  # padded input: padded output, re-padded once here
        pooled = self.pool(enc) if self.pooler is not None else None
        return BaseModelOutputWithPooling(
            last_hidden_state=hidden, pooler_output=pooled, hidden_states=enc.hidden_states()
        )


class MosaicBertLMHead(nn.Module):
    """Dense, GELU, LayerNorm, then a decoder tied to the word embeddings plus its own bias."""

    def __init__(self, config: MosaicBertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = config.hidden_act
        eps = config.layer_norm_eps if config.head_layer_norm_eps is None else config.head_layer_norm_eps
        self.LayerNorm = LayerNorm(config.hidden_size, eps, config.low_precision_layernorm)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, h: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        h = self.LayerNorm(gelu(self.dense(h), self.act))
        return F.linear(h, word_embeddings, self.bias)


@dataclass
class MosaicBertMaskedLMOutput(MaskedLMOutput):
    """With labels, `logits` covers only the masked tokens (M, V) and `masked_labels` is (M,)."""

    masked_labels: torch.Tensor | None = None


class MosaicBertForMaskedLM(MosaicBertPreTrainedModel):
    # a pooler saved beside the MLM weights (imported from BERT) is for the classification heads
    _keys_to_ignore_on_load_unexpected = [r"bert\.pooler\."]

    def __init__(self, config: MosaicBertConfig) -> None:
        super().__init__(config)
        self.bert = MosaicBertModel(config, add_pooling_layer=False)
        self.head = MosaicBertLMHead(config)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        masked_positions: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **_: object,
    ) -> MosaicBertMaskedLMOutput:
        """Takes a mosaicbert_ds.batch.PackedBatch or PaddedBatch as keyword arguments (shapes
        there). labels: IGNORE_INDEX where not masked, same shape as input_ids. masked_positions:
        optional (M,) indices of the masked tokens in the flattened input (T for a packed batch,
        B * L for a padded one), which saves a host sync."""
        enc = self.bert.encode(input_ids, attention_mask, token_type_ids, cu_seqlens, max_seqlen, output_hidden_states)
        wte = self.bert.embeddings.word_embeddings.weight
        if labels is None:
            return MosaicBertMaskedLMOutput(
                logits=enc.repad(self.head(enc.hidden, wte)), hidden_states=enc.hidden_states()
            )
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
        return MosaicBertMaskedLMOutput(
            loss=loss, logits=logits, masked_labels=masked_labels, hidden_states=enc.hidden_states()
        )


def _dropout_and_classifier(config: MosaicBertConfig) -> tuple[nn.Dropout, nn.Linear]:
    """What the classification heads put after the encoder: dropout (classifier_dropout, by default
    hidden_dropout_prob), then a linear layer to num_labels."""
    p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
    return nn.Dropout(p), nn.Linear(config.hidden_size, config.num_labels)


class MosaicBertForSequenceClassification(MosaicBertPreTrainedModel):
    """Pooled first token -> dropout -> linear. num_labels == 1 means regression (STS-B)."""

    def __init__(self, config: MosaicBertConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = MosaicBertModel(config, add_pooling_layer=True)
        self.dropout, self.classifier = _dropout_and_classifier(config)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **_: object,
    ) -> SequenceClassifierOutput:
        enc = self.bert.encode(input_ids, attention_mask, token_type_ids, cu_seqlens, max_seqlen, output_hidden_states)
        logits = self.classifier(self.dropout(self.bert.pool(enc)))
        loss = None
        if labels is not None:
            if self.config.problem_type is None:
                self.config.problem_type = "regression" if self.num_labels == 1 else "single_label_classification"
            if self.config.problem_type == "regression":
                loss = F.mse_loss(logits.squeeze(-1).float(), labels.float())
            elif self.config.problem_type == "single_label_classification":
                loss = F.cross_entropy(logits.float(), labels.long())
            else:
                loss = F.binary_cross_entropy_with_logits(logits.float(), labels.float())
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=enc.hidden_states())


class MosaicBertForTokenClassification(MosaicBertPreTrainedModel):
    """Each token's hidden state -> dropout -> linear (NER-style tagging); labels -100 are ignored."""

    _keys_to_ignore_on_load_unexpected = [r"bert\.pooler\.", r"^head\."]

    def __init__(self, config: MosaicBertConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = MosaicBertModel(config, add_pooling_layer=False)
        self.dropout, self.classifier = _dropout_and_classifier(config)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **_: object,
    ) -> TokenClassifierOutput:
        """logits are (B, L, num_labels) for padded input (zeros at the pads), (T, num_labels) for packed."""
        enc = self.bert.encode(input_ids, attention_mask, token_type_ids, cu_seqlens, max_seqlen, output_hidden_states)
        logits = self.classifier(self.dropout(enc.hidden))
        loss = None
        if labels is not None:
            flat = labels.reshape(-1)
            if enc.gather is not None:
                flat = flat[enc.gather]
            loss = F.cross_entropy(logits.float(), flat.long(), ignore_index=-100)
        return TokenClassifierOutput(loss=loss, logits=enc.repad(logits), hidden_states=enc.hidden_states())


class MosaicBertForQuestionAnswering(MosaicBertPreTrainedModel):
    """Extractive QA: a linear layer gives each token a span-start and a span-end logit."""

    _keys_to_ignore_on_load_unexpected = [r"bert\.pooler\.", r"^head\."]

    def __init__(self, config: MosaicBertConfig) -> None:
        super().__init__(config)
        self.bert = MosaicBertModel(config, add_pooling_layer=False)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        start_positions: torch.Tensor | None = None,
        end_positions: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **_: object,
    ) -> QuestionAnsweringModelOutput:
        """Padded input only: start/end logits are (B, L), -inf-free (pads get 0 and should be masked)."""
        enc = self.bert.encode(input_ids, attention_mask, token_type_ids, None, None, output_hidden_states)
        start, end = enc.repad(self.qa_outputs(enc.hidden)).unbind(dim=-1)
        loss = None
        if start_positions is not None and end_positions is not None:
            n = start.shape[1]  # positions outside the sequence are ignored, as in BERT
            s_pos = start_positions.clamp(0, n).long()
            e_pos = end_positions.clamp(0, n).long()
            loss = (
                F.cross_entropy(start.float(), s_pos, ignore_index=n)
                + F.cross_entropy(end.float(), e_pos, ignore_index=n)
            ) / 2
        return QuestionAnsweringModelOutput(
            loss=loss, start_logits=start, end_logits=end, hidden_states=enc.hidden_states()
        )
