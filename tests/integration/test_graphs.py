"""CUDA-graph step: the bucketing that gives static shapes (CPU), and graph replay against eager (GPU)."""

import pytest
import torch

from mosaicbert_ds import MosaicBertConfig, MosaicBertForMaskedLM
from mosaicbert_ds.graphed_mlm_step import GraphedMLMStep, pad_packed
from mosaicbert_ds.padding import cu_seqlens_from_lengths

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def packed_batch(lengths: list[int], vocab: int, seed: int, device: str = "cpu") -> dict:
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor(lengths)
    total = int(lens.sum())
    ids = torch.randint(5, vocab, (total,), generator=g)
    masked = torch.rand(total, generator=g) < 0.3
    masked[0] = True
    labels = torch.where(masked, ids, -100)
    batch = {
        "input_ids": torch.where(masked, 4, ids),
        "cu_seqlens": cu_seqlens_from_lengths(lens),
        "max_seqlen": max(lengths),
        "labels": labels,
        "masked_positions": masked.nonzero().flatten(),
    }
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


@pytest.mark.parametrize("lengths", [[37, 64, 5], [64, 64], [1], [60, 3, 64, 64, 2]])
def test_pad_packed_shapes(lengths):
    batch = packed_batch(lengths, 100, seed=len(lengths))
    out = pad_packed(batch, token_step=32, mask_step=16)
    total, n = batch["input_ids"].numel(), out["input_ids"].numel()
    assert n % 32 == 0 and total < n <= total + 32
    assert out["masked_positions"].numel() % 16 == 0
    assert out["max_seqlen"] == (16 if max(lengths) <= 16 else 64)  # a power of two, at least 16
    cu = out["cu_seqlens"]
    assert cu.dtype == torch.int32 and out["masked_positions"].dtype == batch["masked_positions"].dtype
    assert torch.equal(cu[: len(lengths) + 1], batch["cu_seqlens"]) and cu[-1] == n
    dummy = cu[len(lengths) + 1 :] - cu[len(lengths) : -1]
    assert dummy.min() >= 0 and dummy.max() <= out["max_seqlen"] and dummy.sum() == n - total
    assert torch.equal(out["labels"][:total], batch["labels"]) and (out["labels"][total:] == -100).all()
    assert (out["labels"][out["masked_positions"]] != -100).sum() == batch["masked_positions"].numel()


def test_pad_packed_keeps_dummy_sequences_short_and_drops_the_sample_count():
    """At long max_seqlen the dummy sequences stay at most DUMMY_SEQLEN tokens (their attention is
    cheap), and a packed rows' "samples" count is no part of the bucket's shape."""
    from mosaicbert_ds.graphed_mlm_step import DUMMY_SEQLEN

    batch = {**packed_batch([2000, 37], 100, seed=1), "samples": 1}
    out = pad_packed(batch, token_step=4096, mask_step=256)
    dummy = out["cu_seqlens"][3:] - out["cu_seqlens"][2:-1]
    assert out["max_seqlen"] == 2048 and "samples" not in out
    assert dummy.max() <= DUMMY_SEQLEN and len(dummy) == 4096 // DUMMY_SEQLEN
    assert out["input_ids"].numel() == 4096 and dummy.sum() == 4096 - 2037


def test_padded_bucket_gives_the_same_loss_and_gradients():
    """The dummy sequences and masked positions change neither the loss nor any gradient."""
    torch.manual_seed(0)
    config = MosaicBertConfig.from_name("tiny", hidden_dropout_prob=0.0)
    model = MosaicBertForMaskedLM(config).train()
    batch = packed_batch([37, 64, 5, 20], config.vocab_size, seed=3)
    results = []
    for b in (batch, pad_packed(batch, token_step=64, mask_step=32)):
        model.zero_grad()
        loss = model(**b).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss, grads), (loss_p, grads_p) = results
    torch.testing.assert_close(loss_p, loss)
    for name, g in grads.items():
        torch.testing.assert_close(grads_p[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_graphed_step_refuses_a_cpu_model_clearly():
    model = MosaicBertForMaskedLM(MosaicBertConfig.from_name("tiny")).train()
    with pytest.raises(ValueError, match="CUDA device"):
        GraphedMLMStep(model)


def _base_model(dropout: float) -> MosaicBertForMaskedLM:
    torch.manual_seed(0)
    return MosaicBertForMaskedLM(MosaicBertConfig.from_name("base", hidden_dropout_prob=dropout)).cuda().train()


@pytest.mark.gpu
@cuda_only
@pytest.mark.parametrize("bf16_weights", [False, True], ids=["autocast", "bf16-weights"])
def test_graph_replay_matches_eager_steps(bf16_weights):
    """Three micro batches of two bucket shapes through the graphs accumulate the same gradients
    (and give the same losses) as eager forward + backward; dropout off."""
    model = _base_model(0.0)
    if bf16_weights:
        model.bfloat16()
    autocast = None if bf16_weights else torch.bfloat16
    batches = [
        packed_batch(lens, 30000, seed=i, device="cuda")
        for i, lens in enumerate([[128] * 30 + [77, 3], [128] * 20 + [1, 50], [128] * 30 + [70, 9]])
    ]
    eager_losses = []
    for b in batches:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast is not None):
            loss = model(**b).loss
        (loss * 0.5).backward()
        eager_losses.append(loss.item())
    del loss  # a live autograd graph would keep AccumulateGrad nodes bound to the default stream
    eager = {n: p.grad.float().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    step = GraphedMLMStep(model, token_step=256, mask_step=128, autocast_dtype=autocast)
    graph_losses = [step(b, grad_scale=0.5).loss.item() for b in batches]
    assert len(step.graphs) == 2  # batches 0 and 2 share a bucket
    for a, b in zip(graph_losses, eager_losses):
        assert abs(a - b) < 2e-2 * abs(b), (graph_losses, eager_losses)
    for name, p in model.named_parameters():
        err = (p.grad.float() - eager[name]).norm() / eager[name].norm().clamp_min(1e-12)
        assert err < 5e-2, f"{name}: relative error {err:.2e}"
    model.zero_grad(set_to_none=True)
    with pytest.raises(RuntimeError, match="set_to_none=False"):
        step(batches[0])


@pytest.mark.gpu
@cuda_only
def test_graph_replay_hands_over_each_batchs_gradients():
    """accumulate=False: after each call every .grad is that batch's gradient alone (the graph's
    own output, nothing allocated up front), across two buckets and back again, with the
    gradients set to None between calls as an optimizer's zero_grad does."""
    model = _base_model(0.0)
    batches = [
        packed_batch(lens, 30000, seed=i, device="cuda")
        for i, lens in enumerate([[128] * 30 + [77, 3], [128] * 20 + [1, 50], [128] * 30 + [70, 9]])
    ]
    eager = []
    for b in batches:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**b).loss
        (loss * 0.5).backward()
        eager.append({n: p.grad.clone() for n, p in model.named_parameters()})
    del loss
    model.zero_grad(set_to_none=True)
    step = GraphedMLMStep(model, token_step=256, mask_step=128, autocast_dtype=torch.bfloat16, accumulate=False)
    assert all(p.grad is None for p in model.parameters())
    for b, expected in zip(batches, eager):
        step(b, grad_scale=0.5)
        for name, p in model.named_parameters():
            assert p.grad.dtype == p.dtype and p.grad.stride() == p.stride(), name
            err = (p.grad - expected[name]).norm() / expected[name].norm().clamp_min(1e-12)
            assert err < 5e-2, f"{name}: relative error {err:.2e}"
        model.zero_grad(set_to_none=True)
    assert len(step.graphs) == 2


@pytest.mark.gpu
@cuda_only
def test_graph_replays_draw_fresh_dropout_masks():
    """The same batch replayed twice gives different losses with dropout on (seeds drawn on the
    device at every replay), and identical ones with dropout off."""
    batch = packed_batch([128] * 16 + [40], 30000, seed=0, device="cuda")
    for dropout, differ in ((0.1, True), (0.0, False)):
        step = GraphedMLMStep(_base_model(dropout), autocast_dtype=torch.bfloat16)
        a, b = (step(batch).loss.item() for _ in range(2))
        assert (a != b) == differ, (dropout, a, b)


TRAINER_SCRIPT = r"""
import json, sys, torch
from mosaicbert_ds import MosaicBertConfig
from mosaicbert_ds.errors import UserError
from mosaicbert_ds.train.distributed import init_distributed
from mosaicbert_ds.train.ds_config import build_ds_config
from mosaicbert_ds.train.graphed_engine_step import GraphedEngineStep
from mosaicbert_ds.train.engine import build_engine
from mosaicbert_ds.train.step import Window, train_step
from benchmarks.synthetic import PRETRAIN, make_batch

preset, micro, dropout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
env = init_distributed()
config = MosaicBertConfig.from_name(preset, hidden_dropout_prob=dropout)
ds = build_ds_config(global_batch=2 * micro, micro_batch=micro, world_size=1, lr=1e-3, bf16=True)
batches = [make_batch(PRETRAIN, micro, vocab=config.vocab_size, seed=i)["packed"] for i in range(6)]


def run(graphs):
    engine, _ = build_engine(config, ds, total_steps=100, warmup_fraction=0.0, final_lr_ratio=0.02,
                             batched_optimizer=graphs)  # as pretrain runs it
    if engine.device.type != "cuda":  # the CPU check: a clear refusal
        try:
            GraphedEngineStep(engine)
        except UserError as err:
            return {"refused": str(err)}
        return {"refused": None}
    graphed = GraphedEngineStep(engine) if graphs else None
    start = torch.cat([p.detach().flatten() for p in engine.optimizer.fp32_groups_flat_partition]).cpu()
    torch.manual_seed(1)
    it = iter(batches)
    losses, norms = [], []
    for _ in range(3):
        window = Window(engine.device)
        train_step(engine, it, 2, 1, window, config, graphed)
        losses.append(window.loss.item() / window.masked)
        norms.append(float(engine.get_global_grad_norm()))
    master = torch.cat([p.detach().flatten() for p in engine.optimizer.fp32_groups_flat_partition])
    return {"losses": losses, "norms": norms, "start": start, "master": master.cpu(),
            "buckets": len(graphed.step.graphs) if graphs else 0}


eager = run(False)
if "refused" in eager:
    print(json.dumps(eager))
    sys.exit(0)
graphs = run(True)
moved = (eager["master"] - graphs["master"]).norm() / (eager["master"] - eager["start"]).norm()
print(json.dumps({"eager": eager["losses"], "graphs": graphs["losses"], "eager_norms": eager["norms"],
                  "graph_norms": graphs["norms"], "update_diff": float(moved), "buckets": graphs["buckets"]}))
"""


def test_graphed_trainer_refuses_a_cpu_engine_clearly():
    if torch.cuda.is_available():
        pytest.skip("the CPU refusal; the GPU path is tested below")
    from tests.helpers.ranks import run_script

    out = run_script(TRAINER_SCRIPT, "tiny", "4", "0.0")
    assert out["refused"] and "CUDA device" in out["refused"]


@pytest.mark.gpu
@cuda_only
def test_graphed_trainer_matches_the_eager_trainer():
    """The DeepSpeed trainer with cuda_graphs (BF16_Optimizer, accumulation 2, three steps) gives
    the eager trainer's losses and gradient norms, and moves the fp32 master weights the same way."""
    from tests.helpers.ranks import run_script

    out = run_script(TRAINER_SCRIPT, "base", "32", "0.0")
    for a, b in zip(out["graphs"], out["eager"]):
        assert abs(a - b) < 1e-2 * abs(b), out
    for a, b in zip(out["graph_norms"], out["eager_norms"]):
        assert abs(a - b) < 5e-2 * abs(b), out
    assert out["update_diff"] < 0.1, out  # relative to the size of the eager run's own update
    assert out["buckets"] >= 1


TOKEN_SCRIPT = r"""
import json, sys, torch
from mosaicbert_ds import MosaicBertConfig
from mosaicbert_ds.data.collator import split_by_tokens
from mosaicbert_ds.train.distributed import init_distributed
from mosaicbert_ds.train.ds_config import build_ds_config
from mosaicbert_ds.train.graphed_engine_step import GraphedEngineStep
from mosaicbert_ds.train.engine import build_engine
from mosaicbert_ds.train.step import Window, train_step
from mosaicbert_ds.train.token_batches import graph_token_step, token_micro_batches
from benchmarks.synthetic import LengthMix, make_batch

micro, budget = int(sys.argv[1]), int(sys.argv[2])
env = init_distributed()
config = MosaicBertConfig.from_name("base", hidden_dropout_prob=0.0)
mix = LengthMix(max_len=1024, full_fraction=0.3, min_len=16, max_partial=1023)  # long, mixed lengths
steps = [make_batch(mix, 2 * micro, vocab=config.vocab_size, seed=i)["packed"] for i in range(4)]


def cut(batch, ends):
    # the packed batch's sequences in contiguous groups, each a packed batch of its own
    cu, out, start = batch["cu_seqlens"].long(), [], 0
    for end in ends:
        a, b = int(cu[start]), int(cu[end])
        labels = batch["labels"][a:b]
        part = cu[start:end + 1] - a
        out.append({"input_ids": batch["input_ids"][a:b], "labels": labels, "cu_seqlens": part.to(torch.int32),
                    "max_seqlen": int((part[1:] - part[:-1]).max()),
                    "masked_positions": (labels != -100).nonzero().flatten()})
        start = end
    return out


def lengths(batch):
    cu = batch["cu_seqlens"]
    return (cu[1:] - cu[:-1]).tolist()


fixed = [m for s in steps for m in cut(s, [micro, 2 * micro])]  # two micro batches of `micro` sequences
tokens = [cut(s, split_by_tokens(lengths(s), budget)) for s in steps]  # one list per step


def run(mode):
    if mode == "fixed":
        ds = build_ds_config(global_batch=2 * micro, micro_batch=micro, world_size=1, lr=1e-3, bf16=True)
    else:
        ds = build_ds_config(global_batch=2 * micro, micro_batch=micro, world_size=1, lr=1e-3, bf16=True)
        token_micro_batches(ds, 1, 1)
    engine, _ = build_engine(config, ds, total_steps=100, warmup_fraction=0.0, final_lr_ratio=0.02)
    graphed = GraphedEngineStep(engine, graph_token_step(budget)) if mode == "graphs" else None
    it = iter(fixed if mode == "fixed" else tokens)
    losses, norms = [], []
    for _ in range(len(steps)):
        window = Window(engine.device)
        train_step(engine, it, engine.gradient_accumulation_steps(), 1, window, config, graphed)
        losses.append(window.loss.item() / window.masked)
        norms.append(float(engine.get_global_grad_norm()))
    return {"losses": losses, "norms": norms, "buckets": len(graphed.step.graphs) if graphed else 0}


print(json.dumps({"counts": [len(s) for s in tokens], **{m: run(m) for m in ("fixed", "tokens", "graphs")}}))
"""


@pytest.mark.gpu
@cuda_only
def test_token_budget_steps_match_fixed_accumulation_eager_and_graphed():
    """BF16_Optimizer with token budgets: steps of several micro batches of at most 8192 tokens (the
    trainer marks the accumulation boundary) give the losses and gradient norms of two fixed micro
    batches of the same sequences, eagerly and as CUDA-graph replays."""
    from tests.helpers.ranks import run_script

    out = run_script(TOKEN_SCRIPT, "16", "8192")
    assert min(out["counts"]) > 2, out["counts"]  # more micro batches than DeepSpeed's accumulation of 1
    for mode in ("tokens", "graphs"):
        for a, b in zip(out[mode]["losses"], out["fixed"]["losses"]):
            assert abs(a - b) < 1e-2 * abs(b), (mode, out)
        for a, b in zip(out[mode]["norms"], out["fixed"]["norms"]):
            assert abs(a - b) < 5e-2 * abs(b), (mode, out)
    assert 1 <= out["graphs"]["buckets"] <= sum(out["counts"]), out["graphs"]["buckets"]
