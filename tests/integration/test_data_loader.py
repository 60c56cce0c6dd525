"""The streaming loader: epochs, shuffling, exact resume, and world-size independence.

A sample is identified by its original tokens (every document of the test corpus is distinct),
so these tests observe only what the trainer observes: the batches.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from streaming.base.batching import generate_work
from streaming.base.world import World

from mosaicbert_ds.data import build_mlm_dataloader, build_mlm_dataset, default_num_canonical_nodes, sample_tokens
from tests.helpers.data import read_split
from tests.helpers.ranks import run_loader_ranks
from tests.helpers.runs import ROOT, cpu_env

SEED, NCN = 3, 4


@pytest.fixture(scope="module")
def data(loader_data) -> Path:
    return loader_data


@pytest.fixture(scope="module")
def index_of(data) -> dict[tuple, int]:
    samples = read_split(data, "train")
    table = {tuple(s.tolist()): i for i, s in enumerate(samples)}
    assert len(table) == len(samples) == 536
    return table


def loader(data, **kwargs):
    kwargs = {
        "split": "train",
        "batch_size": 8,
        "mlm_probability": 0.3,
        "seed": SEED,
        "num_canonical_nodes": NCN,
        **kwargs,
    }
    return build_mlm_dataloader(str(data), **kwargs)


def ids_of(batch, index_of) -> list[int]:
    return [index_of[tuple(s.tolist())] for s in sample_tokens(batch)]


def take(it, n: int) -> list:
    return [next(it) for _ in range(n)]


def same_batches(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x["input_ids"], y["input_ids"])
        and torch.equal(x["labels"], y["labels"])
        and torch.equal(x["cu_seqlens"], y["cu_seqlens"])
        for x, y in zip(a, b)
    )


def test_epochs_cover_the_split_and_reshuffle(data, index_of):
    ld = loader(data)
    epochs = [[ids_of(b, index_of) for b in ld] for _ in range(2)]
    for batches in epochs:
        flat = [i for b in batches for i in b]
        assert all(len(b) == 8 for b in batches) and len(batches) == 536 // 8
        assert len(set(flat)) == len(flat) == 536 // 8 * 8  # drop_last drops the partial batch only
    assert epochs[0] != epochs[1]
    assert epochs[0][0] != sorted(epochs[0][0])  # shuffled
    del ld
    gc.collect()
    again = loader(data)
    assert [ids_of(b, index_of) for b in again] == epochs[0]  # same seed, same order
    other = loader(data, seed=SEED + 1)
    assert [ids_of(b, index_of) for b in other] != epochs[0]


def test_eval_loader_reads_the_val_split_in_order_with_the_same_masks(data):
    val = read_split(data, "val")
    ld = build_mlm_dataloader(
        str(data), split="val", batch_size=10, mlm_probability=0.15, seed=0, shuffle=False, drop_last=False
    )
    first = list(ld)
    assert [s.tolist() for b in first for s in sample_tokens(b)] == [s.tolist() for s in val]
    assert len(first[-1]["cu_seqlens"]) - 1 == 64 % 10  # the partial batch is kept
    partial = [next(iter(ld))]  # an evaluation capped at one batch
    assert same_batches(list(ld), first) and same_batches(partial, first[:1])


def test_resume_continues_exactly(data):
    full_loader = loader(data)
    uninterrupted = list(full_loader) + take(iter(full_loader), 20)  # epoch 0, then 20 batches of epoch 1
    del full_loader
    gc.collect()

    first = loader(data)
    seen = take(iter(first), 25)
    state = first.state_dict()
    assert state["sample_in_epoch"] == 25 * 8 and state["epoch"] == 0
    del first
    gc.collect()
    second = loader(data, num_workers=2)  # another worker count must not matter
    second.load_state_dict(json.loads(json.dumps(state)))  # as stored in a checkpoint
    rest = list(second) + take(iter(second), 20)
    assert same_batches(seen + rest, uninterrupted)


def test_resume_at_the_end_of_an_epoch_starts_the_next(data):
    ld = loader(data)
    epoch0 = list(ld)
    state = ld.state_dict()
    epoch1 = list(ld)
    del ld
    gc.collect()
    resumed = loader(data)
    resumed.load_state_dict(state)
    assert same_batches(list(resumed), epoch1)
    assert len(epoch0) == len(epoch1)


def test_accumulation_steps_drop_the_last_incomplete_step(data):
    ld = loader(data, accumulation_steps=4)
    batches = list(ld)
    assert len(batches) == (536 // 8) // 4 * 4
    assert same_batches(batches, list(loader(data))[: len(batches)])


def global_steps(ids: np.ndarray, micro: int, accum: int) -> list[set[int]]:
    """Samples of each optimizer step from streaming's (nodes, ranks, workers, batches, batch) plan.

    The DataLoader visits workers round robin; -1 marks padding, and drop_last drops a batch
    that has any (the epoch's last, partial one)."""
    nodes, ranks, workers = ids.shape[:3]
    per_rank = [ids[n, r].transpose(1, 0, 2).reshape(-1, micro) for n in range(nodes) for r in range(ranks)]
    per_rank = [p[(p >= 0).all(axis=1)] for p in per_rank]
    steps = min(len(p) for p in per_rank) // accum
    return [{int(i) for p in per_rank for i in p[k * accum : (k + 1) * accum].ravel()} for k in range(steps)]


@pytest.mark.parametrize("ncn", [4, 8])
def test_global_step_is_the_same_set_for_every_layout(data, ncn):
    """World 4 x b, world 2 x b x 2 micro steps, world 1 x b x 4, two nodes, with workers:
    streaming's own partitioning (the plan every rank computes) gives the same step sets."""
    dataset, _ = build_mlm_dataset(str(data), split="train", batch_size=4, seed=SEED, num_canonical_nodes=ncn)
    dataset._set_shuffle_block_size(World(1, 1, 1, 0))
    b = 4
    layouts = {  # (nodes, ranks per node, workers per rank): gradient accumulation for global batch 16
        (1, 4, 1): 1,
        (1, 2, 1): 2,
        (1, 1, 1): 4,
        (2, 2, 1): 1,
        (1, 1, 2): 4,
        (2, 1, 2): 2,
    }
    for resume_at in (0, 5 * 4 * b):
        reference = None
        for (nodes, ranks, workers), accum in layouts.items():
            dataset.batch_size = b
            plan = generate_work("random", dataset, World(nodes, ranks, workers, 0), 0, resume_at)
            steps = global_steps(plan, b, accum)
            reference = reference or steps
            assert steps == reference, (nodes, ranks, workers)
        assert len(reference) >= 20 and all(len(s) == 16 for s in reference)


def test_two_real_ranks_match_accumulation_and_resume_on_one(data, index_of, tmp_path):
    """World 2 x micro 4 for 3 steps, then resumed on world 1 x micro 8: the samples of every
    global step are those of world 1 x micro 4 x 2 accumulation steps, and the resumed run
    continues with exactly the uninterrupted run's batches (masks included)."""
    ranks = run_loader_ranks(2, {"path": str(data), "batch_size": 4, "seed": SEED, "ncn": NCN, "steps": 3}, tmp_path)
    single = list(loader(data, batch_size=4))
    single_ids = [ids_of(b, index_of) for b in single]
    for k in range(3):
        step = {index_of[tuple(s)] for r in ranks for s in r["batches"][k]}
        assert step == set(single_ids[2 * k]) | set(single_ids[2 * k + 1])
    state = ranks[0]["state"]
    assert state == ranks[1]["state"] and state["sample_in_epoch"] == 3 * 2 * 4

    resumed = loader(data, batch_size=8)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert rest, "the resumed epoch is not empty"
    for k, batch in enumerate(rest):
        a, b = single[6 + 2 * k], single[7 + 2 * k]
        assert ids_of(batch, index_of) == ids_of(a, index_of) + ids_of(b, index_of)
        assert torch.equal(batch["input_ids"], torch.cat([a["input_ids"], b["input_ids"]]))
        assert torch.equal(batch["labels"], torch.cat([a["labels"], b["labels"]]))


def test_remote_style_read_through_a_cache(data, index_of, tmp_path):
    local = [ids_of(b, index_of) for b in loader(data)]
    cached = loader(data, remote_cache=str(tmp_path / "cache"))
    assert [ids_of(b, index_of) for b in cached] == local
    assert list((tmp_path / "cache" / "train").rglob("shard.*"))


def test_default_canonical_nodes_depend_on_size_only():
    assert default_num_canonical_nodes(536) == 1
    assert default_num_canonical_nodes(4096 * 8) == 8
    assert default_num_canonical_nodes(365_000_000) == 64


def test_wrong_split_and_node_count_are_user_errors(data, monkeypatch):
    from mosaicbert_ds.cli import UserError

    with pytest.raises(UserError, match="no 'test' split"):
        loader(data, split="test")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    with pytest.raises(UserError, match="num_canonical_nodes=4 and 3 nodes"):
        loader(data)


def test_a_kept_decompressed_copy_is_read_only_as_made_from_its_checked_shard(data, index_of, tmp_path):
    """Streaming keeps each decompressed `.mds` beside its `.mds.zstd` and reads it in later runs.
    A copy garbled at the same size with a newer mtime (what the shard hash never sees) is not
    read: without a stamp matching it, it is decompressed again from the checked shard."""
    import shutil
    import time

    copy = Path(shutil.copytree(data, tmp_path / "ds"))
    first = [ids_of(b, index_of) for b in loader(copy)]
    kept = sorted((copy / "train").rglob("*.mds"))
    assert kept and all(p.with_name(p.name + ".checked").is_file() for p in kept)
    garbled = kept[len(kept) // 2]
    size = garbled.stat().st_size
    garbled.write_bytes(os.urandom(size))
    later = time.time() + 60
    os.utime(garbled, (later, later))  # newer than its compressed shard, as a rewrite would be
    assert [ids_of(b, index_of) for b in loader(copy)] == first
    assert garbled.stat().st_size == size and garbled.stat().st_mtime < later  # made again


# ---- token budgets and packed rows ------------------------------------------------------------


def concat(step: list[dict], key: str) -> torch.Tensor:
    return torch.cat([m[key] for m in step])


def lengths_of(batch: dict) -> list[int]:
    cu = batch["cu_seqlens"]
    return (cu[1:] - cu[:-1]).tolist()


def test_token_budget_splits_each_step_into_whole_samples(data):
    """A step read with micro_tokens is the same samples, in the same order and with the same
    masks, as without: only cut into micro batches of at most the budget, as few as fit."""
    fixed = take(iter(loader(data, batch_size=16)), 6)
    steps = take(iter(loader(data, batch_size=16, micro_tokens=400)), 6)
    for step, batch in zip(steps, fixed):
        assert all(m["input_ids"].numel() <= 400 for m in step)
        for key in ("input_ids", "labels"):
            assert torch.equal(concat(step, key), batch[key])
        lengths = lengths_of(batch)
        assert [n for m in step for n in lengths_of(m)] == lengths
        fewest, used = 1, 0  # next-fit: the fewest contiguous groups within the budget
        for n in lengths:
            fewest, used = (fewest + 1, n) if used + n > 400 else (fewest, used + n)
        assert len(step) == fewest
    assert len({len(s) for s in steps}) > 1, "the number of micro batches varies with the lengths"


def test_token_budget_resume_continues_exactly_in_either_mode(data):
    """The position is counted in samples: a token-budget loader resumes a fixed-batch one's state
    and the other way round, on the step boundary, with the uninterrupted batches."""
    uninterrupted = take(iter(loader(data, batch_size=16, micro_tokens=500)), 10)
    first = loader(data, batch_size=16, micro_tokens=500)
    take(iter(first), 4)
    state = first.state_dict()
    assert state["sample_in_epoch"] == 4 * 16
    del first
    gc.collect()
    resumed = loader(data, batch_size=16, micro_tokens=500)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    rest = take(iter(resumed), 6)
    assert [len(s) for s in rest] == [len(s) for s in uninterrupted[4:]]
    for a, b in zip(rest, uninterrupted[4:]):
        assert same_batches(a, b)
    del resumed
    gc.collect()
    fixed = loader(data, batch_size=16)
    fixed.load_state_dict(state)
    for batch, step in zip(take(iter(fixed), 6), uninterrupted[4:]):
        assert torch.equal(batch["input_ids"], concat(step, "input_ids"))


def test_token_budget_two_ranks_see_the_steps_of_one(data, index_of, tmp_path):
    """Two real ranks reading 8 samples each per step, split by a token budget, see exactly the
    samples of one rank reading 16 per step, although their micro batch counts differ."""
    ranks = run_loader_ranks(
        2, {"path": str(data), "batch_size": 8, "seed": SEED, "ncn": NCN, "steps": 4, "micro_tokens": 200}, tmp_path
    )
    single = take(iter(loader(data, batch_size=16, micro_tokens=200)), 4)
    for k, step in enumerate(single):
        assert {index_of[tuple(s)] for r in ranks for s in r["batches"][k]} == {
            i for m in step for i in ids_of(m, index_of)
        }
    counts = [r["micro_counts"] for r in ranks]
    assert counts[0] != counts[1], counts  # the accumulation boundary differs per rank
    assert ranks[0]["state"] == ranks[1]["state"] and ranks[0]["state"]["sample_in_epoch"] == 4 * 16


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    from tests.helpers.data import convert_docs, jargon_docs, tokenizer_dir

    tokenizer_dir(tmp_path_factory)
    return convert_docs(
        tmp_path_factory.mktemp("packed"), jargon_docs(300), max_seq_len=256, split_long=True, pack=True, val_docs=20
    )


def test_packed_rows_give_each_sequence_its_own_span(packed):
    """Packed rows: cu_seqlens marks every [CLS] ... [SEP] sequence, "samples" counts the rows (the
    resume position), every stored sequence comes out once per epoch, and the padded layout gives
    each sequence its own row with the same masks."""
    rows = read_split(packed, "train")
    expected = sorted(tuple(s.tolist()) for r in rows for s in np.split(r, np.flatnonzero(r == 2)[1:]))
    ld = loader(packed, batch_size=4, num_canonical_nodes=1, drop_last=False)
    sequences = []
    for batch in ld:
        assert len(batch["cu_seqlens"]) - 1 >= batch["samples"]
        assert batch["max_seqlen"] == max(lengths_of(batch)) <= 256
        for s in sample_tokens(batch):
            assert s[0] == 2 and s[-1] == 3 and not np.isin(s[1:-1], [2, 3]).any()  # one [CLS] ... [SEP]
            sequences.append(tuple(s.tolist()))
    assert ld.state_dict()["sample_in_epoch"] == len(rows)  # rows, not sequences
    assert sorted(sequences) == expected and len(expected) > 2 * len(rows)
    first = next(iter(loader(packed, batch_size=4, num_canonical_nodes=1)))
    padded = next(iter(loader(packed, batch_size=4, num_canonical_nodes=1, padded=True)))
    assert padded["samples"] == 4 and padded["input_ids"].shape[0] == len(first["cu_seqlens"]) - 1
    assert [s.tolist() for s in sample_tokens(padded)] == [s.tolist() for s in sample_tokens(first)]
    mask = padded["attention_mask"].bool()
    assert torch.equal(padded["labels"][mask], first["labels"])


# One job: wait for the shared start time, build the dataset, report its shared-memory prefix,
# and hold the dataset until the parent says every job has reported.
ONE_JOB = """
import sys, time
from mosaicbert_ds.data import build_mlm_dataset
start = float(sys.argv[2])
time.sleep(max(start - time.time(), 0))
dataset, _ = build_mlm_dataset(sys.argv[1], split="train", batch_size=4, seed=0)
print(dataset._shm_prefix_int, flush=True)
sys.stdin.read()
"""


def test_jobs_that_start_at_the_same_moment_on_one_host_all_start(data):
    """streaming registers a dataset's shared memory under the first free prefix with no lock
    between looking and taking it: without the host lock around the registration, jobs that
    start together fail with FileExistsError ('/NNNNNN_locals')."""
    start = time.time() + 8  # after every job's imports
    jobs = [
        subprocess.Popen(
            [sys.executable, "-c", ONE_JOB, str(data), str(start)],
            cwd=ROOT,
            env=cpu_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    prefixes = []
    try:
        for job in jobs:
            line = job.stdout.readline()
            assert line.strip().isdigit(), job.communicate(timeout=60)[1][-2000:]
            prefixes.append(int(line))
    finally:
        for job in jobs:
            job.communicate(input="", timeout=60)
    assert len(set(prefixes)) == 4, prefixes  # each job its own shared memory
