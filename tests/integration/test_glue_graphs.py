"""GLUE finetuning with CUDA graphs (GPU): graphed steps against eager ones, fresh dropout masks per
replay, and finetune-glue --cuda-graphs end to end. The bucketing and the refusals: CPU tests in
tests/unit/test_glue_graph_buckets.py."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mosaicbert_ds import MosaicBertConfig, MosaicBertForMaskedLM, MosaicBertForSequenceClassification, cli
from mosaicbert_ds.glue.data import Tokenized
from mosaicbert_ds.glue.finetune import finetune_glue
from mosaicbert_ds.glue.finetune_config import load_finetune_config
from mosaicbert_ds.glue.graphed_step import GraphedGlueStep, pad_glue
from mosaicbert_ds.glue.runtime import Runtime
from mosaicbert_ds.glue.trainer import train_step
from tests.helpers.glue import TSV, make_bert_model, make_tokenizer

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
pytestmark = [pytest.mark.gpu, cuda_only]


def tokenized(lengths: list[int], num_labels: int, seed: int) -> Tokenized:
    """Sentence pairs of the given lengths (type 0, then type 1), random ids and labels."""
    rng = np.random.default_rng(seed)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    types = np.concatenate([(np.arange(n) >= n // 2).astype(np.int8) for n in lengths])
    ids = rng.integers(5, 30000, offsets[-1]).astype(np.int32)
    n = len(lengths)
    labels = rng.uniform(0, 5, n).astype(np.float32) if num_labels == 1 else rng.integers(0, num_labels, n)
    return Tokenized(ids, types, offsets, labels)


def glue_batches(num_labels: int) -> list[dict]:
    """Four batches of GLUE-like pairs (8..120 tokens, mean about 64): the second has the first's
    lengths in another order (the same bucket, other contents), the last is a partial batch."""
    rng = np.random.default_rng(0)
    first = rng.integers(8, 121, 32).tolist()
    sizes = [first, list(reversed(first)), rng.integers(8, 121, 32).tolist(), rng.integers(8, 121, 11).tolist()]
    return [
        tokenized(lengths, num_labels, seed=i).batch(np.arange(len(lengths)), packed=True)
        for i, lengths in enumerate(sizes)
    ]


def classifier(num_labels: int, dropout: float = 0.0, head_dropout: float | None = None):
    torch.manual_seed(0)
    config = MosaicBertConfig.from_name(
        "base", hidden_dropout_prob=dropout, classifier_dropout=head_dropout, num_labels=num_labels
    )
    config.problem_type = "regression" if num_labels == 1 else "single_label_classification"
    return MosaicBertForSequenceClassification(config).cuda().train()


def bucket(batch: dict) -> tuple:
    return tuple((k, tuple(v.shape) if torch.is_tensor(v) else v) for k, v in sorted(pad_glue(batch).items()))


@pytest.mark.parametrize("num_labels", [3, 1], ids=["classification", "regression"])
def test_graphed_steps_match_eager_steps(num_labels):
    """The first batch's gradients, then four optimizer steps (AdamW, clipping) through the trainer's
    train_step: graph replays give the eager losses and move the weights the same way (bf16
    autocast, dropout off)."""
    rt = Runtime(torch.device("cuda"))
    eager_model = classifier(num_labels)
    graph_model = copy.deepcopy(eager_model)
    start = {n: p.detach().clone() for n, p in eager_model.named_parameters()}
    batches = glue_batches(num_labels)
    graphed = GraphedGlueStep(graph_model)

    # gradients of one batch
    with rt.autocast():
        eager_loss = eager_model(**{k: v.cuda() if torch.is_tensor(v) else v for k, v in batches[0].items()}).loss
    eager_loss.backward()
    graph_loss = graphed(batches[0]).loss.item()
    assert abs(graph_loss - eager_loss.item()) < 1e-2 * abs(eager_loss.item()), (graph_loss, eager_loss.item())
    for name, p in graph_model.named_parameters():
        expected = eager_model.get_parameter(name).grad
        err = (p.grad - expected).norm() / expected.norm().clamp_min(1e-12)
        assert err < 5e-2, f"{name}: relative error {err:.2e}"
    eager_model.zero_grad(set_to_none=True)
    graph_model.zero_grad(set_to_none=True)

    # optimizer steps
    losses = {}
    for name, model, step in (("eager", eager_model, None), ("graphs", graph_model, graphed)):
        opt = torch.optim.AdamW(model.parameters(), lr=2e-5, betas=(0.9, 0.98), eps=1e-6)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        losses[name] = [train_step(model, b, opt, sched, 1.0, rt, step).item() for b in batches]
    for a, b in zip(losses["graphs"], losses["eager"]):
        assert abs(a - b) < 2e-2 * abs(b) + 1e-3, losses
    assert len(graphed.graphs) == len({bucket(b) for b in batches}) == 3  # batches 0 and 1 share one
    moved = sum((graph_model.get_parameter(n) - eager_model.get_parameter(n)).norm() ** 2 for n in start) ** 0.5
    update = sum((eager_model.get_parameter(n) - p0).norm() ** 2 for n, p0 in start.items()) ** 0.5
    assert moved / update < 0.1, float(moved / update)


@pytest.mark.parametrize(
    "dropout, head_dropout, differ",
    [(0.1, None, True), (0.0, 0.1, True), (0.0, None, False)],
    ids=["encoder-and-head", "head-only", "off"],
)
def test_graph_replays_draw_fresh_dropout_masks(dropout, head_dropout, differ):
    """The same batch replayed twice gives different losses where dropout is on (the fused kernels'
    device-side seeds, and the head's nn.Dropout through torch's CUDA generator), identical ones
    with dropout off."""
    graphed = GraphedGlueStep(classifier(3, dropout, head_dropout))
    batch = glue_batches(3)[0]
    a, b = (graphed(batch).loss.item() for _ in range(2))
    assert (a != b) == differ, (a, b)


def tiny_mosaic_folder(folder: Path) -> Path:
    """A tiny MosaicBERT (head size 32: the Triton attention kernel's) without dropout, with the
    fixtures' tokenizer."""
    tok = make_tokenizer(folder)
    torch.manual_seed(0)
    config = MosaicBertConfig.from_name("tiny", vocab_size=len(tok), hidden_dropout_prob=0.0)
    MosaicBertForMaskedLM(config).save_pretrained(str(folder))
    return folder


def test_finetune_glue_with_cuda_graphs_matches_eager(tmp_path: Path):
    """finetune-glue with run.cuda_graphs=true trains SST-2 and STS-B (classification and
    regression) as the eager run does: the same steps, close training losses, dev metrics."""
    model = tiny_mosaic_folder(tmp_path / "model")
    results = {}
    for graphs in (False, True):
        out = tmp_path / f"out-{graphs}"
        settings = [f"data.dir={TSV}", "run.progress=false", "tasks.names=sst2,stsb", "tasks.seeds=1"]
        settings += ["tasks.mnli_start=false", "hparams.lr=1e-4", "hparams.epochs=2"]
        cfg = load_finetune_config(
            [*settings, f"run.cuda_graphs={str(graphs).lower()}"], model=str(model), out=str(out)
        )
        finetune_glue(cfg)
        seed = f"seed{cfg.tasks.first_seed}"
        results[graphs] = {t: json.loads((out / t / seed / "result.json").read_text()) for t in ("sst2", "stsb")}
    for name in ("sst2", "stsb"):
        eager, graphs = results[False][name], results[True][name]
        assert (eager["cuda_graphs"], graphs["cuda_graphs"]) == (False, True)
        assert graphs["steps"] == eager["steps"] > 0
        assert abs(graphs["train_loss_recent"] - eager["train_loss_recent"]) < 0.05 * eager["train_loss_recent"] + 0.01
        assert set(graphs["metrics"]) == set(eager["metrics"])
        assert all(math.isfinite(v) for v in graphs["metrics"].values()), graphs["metrics"]


def test_cuda_graphs_with_a_bert_model_is_one_line_exit_2(tmp_path: Path, capsys):
    model = make_bert_model(tmp_path / "bert")
    out = tmp_path / "out"
    rc = cli.main(
        ["finetune-glue", str(model), "--out", str(out), "--data-dir", str(TSV), "--tasks", "sst2", "--cuda-graphs"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == [
        "mosaicbert-ds finetune-glue: error: run.cuda_graphs=true (--cuda-graphs) cannot run: it needs a MosaicBERT "
        "model (this one is 'bert', run on padded batches)"
    ], err
    assert not out.exists()
