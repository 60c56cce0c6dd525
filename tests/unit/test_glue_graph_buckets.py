"""The GLUE CUDA-graph step on the CPU: its bucketing (static shapes, the documented sizes), that the
padded batch gives the unpadded batch's loss and gradients (eager, float32), and the one-line
refusals of run.cuda_graphs. The replays themselves: tests/integration/test_glue_graphs.py (GPU)."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import BertConfig

from mosaicbert_ds import MosaicBertConfig, MosaicBertForSequenceClassification, cli
from mosaicbert_ds.errors import UserError
from mosaicbert_ds.glue import finetune
from mosaicbert_ds.glue.data import Tokenized
from mosaicbert_ds.glue.finetune_config import load_finetune_config
from mosaicbert_ds.glue.graphed_step import (
    GraphedGlueStep,
    graphs_unsupported,
    pad_glue,
    token_bucket,
    weighted_loss,
)
from mosaicbert_ds.glue.runtime import Runtime
from mosaicbert_ds.glue.trainer import make_graphed_step
from mosaicbert_ds.graphed_mlm_step import DUMMY_SEQLEN

pytestmark = pytest.mark.usefixtures("one_thread")


def tokenized(lengths: list[int], num_labels: int, seed: int = 0, vocab: int = 1024) -> Tokenized:
    """Sentence pairs of the given lengths (first half type 0, second half type 1), random labels."""
    rng = np.random.default_rng(seed)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    types = np.concatenate([(np.arange(n) >= n // 2).astype(np.int8) for n in lengths])
    ids = rng.integers(5, vocab, offsets[-1]).astype(np.int32)
    labels = (
        rng.uniform(0, 5, len(lengths)).astype(np.float32)
        if num_labels == 1
        else rng.integers(0, num_labels, len(lengths))
    )
    return Tokenized(ids, types, offsets, labels)


def glue_batch(lengths: list[int], num_labels: int = 3, seed: int = 0) -> dict:
    return tokenized(lengths, num_labels, seed).batch(np.arange(len(lengths)), packed=True)


# ---------------------------------------------------------------------------------------------
# Bucket shapes


def test_token_buckets_are_eight_per_power_of_two_and_at_least_16_wide():
    # [2^k, 2^(k+1)) in steps of 2^k / 8, at least 16; always at least one token more than n
    assert [token_bucket(n) for n in (1, 15, 16, 100, 127, 128, 143, 144)] == [16, 16, 32, 112, 128, 144, 144, 160]
    assert [token_bucket(n) for n in (640, 703, 704, 1023, 1024, 2047, 2048, 3000)] == [
        704,  # 512..1023: steps of 64
        704,
        768,
        1024,
        1152,  # 1024..2047: steps of 128
        2048,
        2304,  # 2048..4095: steps of 256
        3072,
    ]
    for n in range(1, 5000, 37):
        assert n < token_bucket(n) <= n + max(16, n // 8)


@pytest.mark.parametrize(
    "lengths",
    [[37, 64, 5, 20], [128] * 16, [1], [200, 3, 256, 17, 90, 64, 64, 30], [9] * 48, [300, 12]],
    ids=["mixed", "full-16", "one-token", "long-pairs", "batch-48", "beyond-256"],
)
def test_pad_glue_shapes(lengths):
    batch = glue_batch(lengths)
    out = pad_glue(batch)
    rows, total = len(lengths), sum(lengths)
    n, n_rows = out["input_ids"].numel(), out["labels"].numel()
    assert n == token_bucket(total) and out["token_type_ids"].numel() == n
    assert n_rows % 8 == 0 and n_rows > rows and out["loss_weights"].shape == (n_rows,)
    assert out["max_seqlen"] == max(16, 1 << (max(lengths) - 1).bit_length())  # a power of two, >= 16
    cu = out["cu_seqlens"]
    assert cu.dtype == torch.int32 and cu.numel() == n_rows + 1 and int(cu[-1]) == n
    # the real rows and tokens first, unchanged
    assert torch.equal(cu[: rows + 1], batch["cu_seqlens"])
    for key in ("input_ids", "token_type_ids"):  # pad id 0, token type 0
        assert torch.equal(out[key][:total], batch[key]) and (out[key][total:] == 0).all()
    assert torch.equal(out["labels"][:rows], batch["labels"]) and (out["labels"][rows:] == 0).all()
    # dummy rows: at most min(max_seqlen, DUMMY_SEQLEN) tokens, the last one not empty, every row's
    # first token (what the pooler reads) a real index
    dummy = (cu[rows + 1 :] - cu[rows:-1]).tolist()
    assert min(dummy) >= 0 and max(dummy) <= min(out["max_seqlen"], DUMMY_SEQLEN) and dummy[-1] > 0
    assert sorted(dummy) == dummy and int(cu[:-1].max()) < n
    # mean over the real rows only
    weights = out["loss_weights"]
    assert weights.dtype == torch.float32 and (weights[rows:] == 0).all()
    torch.testing.assert_close(weights[:rows], torch.full((rows,), 1 / rows))


def test_batches_of_one_bucket_share_every_shape():
    """Two batches of the same size whose token counts fall into one bucket get identical shapes
    (one graph), whatever their lengths."""
    a, b = pad_glue(glue_batch([60, 70, 80, 90])), pad_glue(glue_batch([100, 100, 60, 30]))
    assert {k: tuple(v.shape) if torch.is_tensor(v) else v for k, v in a.items()} == {
        k: tuple(v.shape) if torch.is_tensor(v) else v for k, v in b.items()
    }


# ---------------------------------------------------------------------------------------------
# Same loss and gradients


def tiny_classifier(num_labels: int) -> MosaicBertForSequenceClassification:
    torch.manual_seed(0)
    config = MosaicBertConfig.from_name("tiny", hidden_dropout_prob=0.0, num_labels=num_labels)
    config.problem_type = "regression" if num_labels == 1 else "single_label_classification"
    return MosaicBertForSequenceClassification(config).train()


@pytest.mark.parametrize("num_labels", [3, 1], ids=["classification", "regression"])
def test_padded_bucket_gives_the_unpadded_loss_and_gradients(num_labels):
    """What GraphedGlueStep captures (the model without labels on pad_glue's batch, then
    weighted_loss) gives the model's own mean loss on the unpadded batch, the same logits for the
    real rows and the same gradient for every parameter (float32, eager)."""
    model = tiny_classifier(num_labels)
    batch = glue_batch([37, 64, 5, 20, 120, 9], num_labels, seed=num_labels)
    padded = pad_glue(batch)
    assert padded["labels"].numel() > 6 and padded["input_ids"].numel() > batch["input_ids"].numel()

    model.zero_grad()
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    inputs = {k: v for k, v in padded.items() if k not in ("labels", "loss_weights")}
    logits = model(**inputs).logits
    kind = "regression" if num_labels == 1 else "single_label_classification"
    loss = weighted_loss(logits, padded["labels"], padded["loss_weights"], kind)
    loss.backward()

    torch.testing.assert_close(loss, out.loss)
    torch.testing.assert_close(logits[:6], out.logits)
    for name, g in grads.items():
        torch.testing.assert_close(model.get_parameter(name).grad, g, rtol=1e-4, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------------------------
# What can be captured, and the setting


def test_graphs_unsupported_names_the_reason():
    assert graphs_unsupported(MosaicBertConfig.from_name("base")) is None
    assert graphs_unsupported(MosaicBertConfig.from_name("tiny")) is None  # head size 32
    cases = [
        (BertConfig(), "it needs a MosaicBERT model (this one is 'bert', run on padded batches)"),
        (MosaicBertConfig.from_name("bert-base"), "it needs a model run on the packed token stream (unpad: true)"),
        (
            MosaicBertConfig.from_name("base", attention_impl="torch"),
            "attention_impl=torch runs the reference attention, which waits for the host",
        ),
        (
            MosaicBertConfig.from_name("base", attention_probs_dropout_prob=0.1),
            "the Triton attention kernel has no dropout (attention_probs_dropout_prob must be 0)",
        ),
        (
            MosaicBertConfig.from_name("base", num_attention_heads=48),
            "the Triton attention kernel takes head sizes 32, 64 or 128, not 16",
        ),
    ]
    for config, reason in cases:
        assert graphs_unsupported(config) == reason


def test_the_graphed_step_refuses_cpu_and_ddp_with_one_line():
    model = tiny_classifier(3)
    with pytest.raises(ValueError, match="CUDA graphs need a model on a CUDA device"):
        GraphedGlueStep(model)
    for rt in (Runtime(torch.device("cpu")), Runtime(torch.device("cpu"), rank=0, world_size=2)):
        with pytest.raises(UserError, match=r"^run.cuda_graphs=true runs on one CUDA device \(one process\)$"):
            make_graphed_step(model, rt, 0)
    bert = MosaicBertForSequenceClassification(MosaicBertConfig.from_name("tiny", attention_impl="torch"))
    with pytest.raises(ValueError, match="attention_impl=torch"):
        GraphedGlueStep(bert)


def from_command_line(argv: list[str]):
    parser = argparse.ArgumentParser()
    finetune.add_arguments(parser)
    args = parser.parse_intermixed_args(["m", "--out", "o", *argv])  # as cli.main parses them
    return load_finetune_config(args.overrides, args, model=args.model, out=args.out)


def test_the_flag_sets_the_key():
    assert from_command_line(["--cuda-graphs"]).run == from_command_line(["run.cuda_graphs=true"]).run
    assert from_command_line(["--no-cuda-graphs"]).run == from_command_line(["run.cuda_graphs=false"]).run
    assert from_command_line([]).run.cuda_graphs is None


def test_auto_is_off_and_true_is_refused_where_it_cannot_run():
    auto = load_finetune_config(model="m", out="o")
    assert auto.run.cuda_graphs is None and auto.use_cuda_graphs(True, 1) is False
    assert load_finetune_config(["run.cuda_graphs=false"], model="m", out="o").use_cuda_graphs(True, 1) is False
    on = load_finetune_config(["run.cuda_graphs=true"], model="m", out="o")
    assert on.use_cuda_graphs(True, 1) is True
    with pytest.raises(UserError) as err:
        on.use_cuda_graphs(False, 1)
    assert str(err.value) == "run.cuda_graphs=true (--cuda-graphs) needs a CUDA device; none is visible"
    with pytest.raises(UserError) as err:
        on.use_cuda_graphs(True, 4)
    assert str(err.value) == (
        "run.cuda_graphs=true (--cuda-graphs) runs in one process; this run has 4 (DDP finetuning stays eager)"
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal where no CUDA device is visible")
def test_cuda_graphs_without_a_gpu_is_refused_before_anything_is_read(tmp_path: Path, capsys):
    from tests.helpers.glue import make_mosaic_model

    model = make_mosaic_model(tmp_path / "model")
    out = tmp_path / "out"
    rc = cli.main(
        ["finetune-glue", str(model), "--out", str(out), "--cuda-graphs", "--data-dir", str(tmp_path / "none")]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == [
        "mosaicbert-ds finetune-glue: error: run.cuda_graphs=true (--cuda-graphs) needs a CUDA device; none is visible"
    ]
    assert not out.exists()
