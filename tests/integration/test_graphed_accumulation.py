"""The CUDA-graph step's hand-over to DeepSpeed, on the CPU without a graph: gradients added into
BF16_Optimizer's own fp32 buffers (what the replay does) plus `graphed_backward_epilogue` give the
optimizer step of `engine.backward`, bitwise. The GPU test in test_graphs.py runs the graphs."""

import pytest
import torch
from torch.nn.utils.stateless import _reparametrize_module

pytestmark = pytest.mark.slow


def _engine():
    from mosaicbert_ds import MosaicBertConfig
    from mosaicbert_ds.train.ds_config import build_ds_config
    from mosaicbert_ds.train.engine import build_engine

    config = MosaicBertConfig.from_name("tiny", vocab_size=512)
    ds = build_ds_config(global_batch=4, micro_batch=2, world_size=1, lr=1e-2, bf16=True)
    engine, _ = build_engine(config, ds, total_steps=10, warmup_fraction=0.0, final_lr_ratio=0.02)
    assert type(engine.optimizer).__name__ == "BF16_Optimizer"
    return engine


def _batches():
    from benchmarks.synthetic import PRETRAIN, make_batch

    return [make_batch(PRETRAIN, 2, vocab=512, seed=i)["packed"] for i in range(4)]


def test_in_graph_accumulation_steps_like_engine_backward(one_gloo_rank):
    from mosaicbert_ds.train.deepspeed_internals import fp32_gradient_buffers, graphed_backward_epilogue

    batches = _batches()

    eager = _engine()
    torch.manual_seed(3)
    norms = []
    for batch in batches:
        eager.backward(eager(**batch).loss)
        eager.step()
        norms.append(eager.get_global_grad_norm())

    graphed = _engine()
    model = graphed.module
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    buffers = fp32_gradient_buffers(graphed, [p for _, p in named])
    assert all(b is not None and b.dtype == torch.float32 for b in buffers)
    torch.manual_seed(3)
    graph_norms = []
    for batch in batches:  # what GraphedMLMStep replays: autograd on parameter aliases, one foreach add
        aliases = [p.detach().requires_grad_() for _, p in named]
        with _reparametrize_module(model, {n: a for (n, _), a in zip(named, aliases)}, tie_weights=True):
            loss = model(**batch).loss
        grads = torch.autograd.grad(loss / graphed.gradient_accumulation_steps(), aliases, allow_unused=True)
        used = [(b, g) for b, g in zip(buffers, grads) if g is not None]
        torch._foreach_add_([b for b, _ in used], [g.reshape(b.shape) for b, g in used])
        graphed_backward_epilogue(graphed, tuple(g is not None for g in grads))
        assert all(p.grad is None for _, p in named), "no bf16 gradient outlives the step"
        graphed.step()
        graph_norms.append(graphed.get_global_grad_norm())

    assert [float(n) for n in graph_norms if n is not None] == [float(n) for n in norms if n is not None]
    for a, b in zip(eager.optimizer.fp32_groups_flat_partition, graphed.optimizer.fp32_groups_flat_partition):
        assert torch.equal(a, b)
