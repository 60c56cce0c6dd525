"""MLM masking and batch layout: rates, the 80/10/10 rule, specials, determinism, shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mosaicbert_ds.data import MLMCollator

PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
VOCAB = 1000
UNUSED = np.arange(5, 15)  # "[unusedN]" entries: real ids, never random replacements
REPLACEMENT = np.arange(15, VOCAB)


def collator(p: float = 0.30, seed: int = 0, **kwargs) -> MLMCollator:
    return MLMCollator(
        mask_token_id=MASK,
        pad_token_id=PAD,
        special_token_ids=[PAD, UNK, CLS, SEP, MASK],
        replacement_ids=REPLACEMENT,
        mlm_probability=p,
        seed=seed,
        **kwargs,
    )


def make_samples(n: int, rng: np.random.Generator, min_len: int = 3, max_len: int = 128, first_index: int = 0):
    samples = []
    for i in range(n):
        body = rng.integers(15, VOCAB, rng.integers(min_len - 2, max_len - 1))
        ids = np.concatenate([[CLS], body, [SEP]]).astype(np.uint16)
        samples.append({"input_ids": ids, "index": first_index + i, "epoch": 0})
    return samples


def originals(samples) -> np.ndarray:
    return np.concatenate([s["input_ids"].astype(np.int64) for s in samples])


@pytest.mark.parametrize("p", [0.30, 0.15])
def test_masking_rate_and_80_10_10(p):
    samples = make_samples(3000, np.random.default_rng(0), min_len=100)
    batch = collator(p)(samples)
    ids, inputs, labels = originals(samples), batch["input_ids"].numpy(), batch["labels"].numpy()
    maskable = (ids != CLS) & (ids != SEP)
    chosen = labels != -100
    n = maskable.sum()
    rate = chosen.sum() / n
    assert abs(rate - p) < 5 * np.sqrt(p * (1 - p) / n) + 1e-4, rate
    assert (labels[chosen] == ids[chosen]).all()
    m = chosen.sum()
    as_mask = (inputs[chosen] == MASK).mean()
    kept = (inputs[chosen] == ids[chosen]).mean()
    replaced = ((inputs[chosen] != MASK) & (inputs[chosen] != ids[chosen])).mean()
    tol = 5 * np.sqrt(0.8 * 0.2 / m)
    assert abs(as_mask - 0.8) < tol and abs(kept - 0.1) < tol and abs(replaced - 0.1) < tol, (as_mask, kept, replaced)
    # random replacements come from the real vocabulary only, roughly uniformly
    drawn = inputs[chosen & (inputs != MASK) & (inputs != ids)]
    assert np.isin(drawn, REPLACEMENT).all()
    assert len(np.unique(drawn)) > 0.5 * len(REPLACEMENT)
    # unchosen tokens are untouched
    assert (inputs[~chosen] == ids[~chosen]).all()


def test_special_tokens_are_never_masked():
    rng = np.random.default_rng(1)
    samples = []
    for i in range(400):
        body = rng.choice([PAD, UNK, MASK, 20, 21, 22], size=60)
        samples.append({"input_ids": np.concatenate([[CLS], body, [SEP]]).astype(np.uint16), "index": i})
    batch = collator(0.9)(samples)
    ids, inputs, labels = originals(samples), batch["input_ids"].numpy(), batch["labels"].numpy()
    special = np.isin(ids, [PAD, UNK, CLS, SEP, MASK])
    assert (labels[special] == -100).all() and (inputs[special] == ids[special]).all()
    assert (labels[~special] != -100).mean() > 0.85


def test_unpadded_batch_layout():
    samples = make_samples(7, np.random.default_rng(2), min_len=3, max_len=97)
    batch = collator()(samples)
    assert list(batch) == ["input_ids", "cu_seqlens", "max_seqlen", "labels", "masked_positions"]
    lengths = [len(s["input_ids"]) for s in samples]
    T = sum(lengths)
    assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape == (T,)
    assert batch["labels"].dtype == torch.long and batch["labels"].shape == (T,)
    cu = batch["cu_seqlens"]
    assert cu.dtype == torch.int32 and cu.shape == (8,) and cu[0] == 0 and cu[-1] == T
    assert (cu[1:] - cu[:-1]).tolist() == lengths
    assert isinstance(batch["max_seqlen"], int) and batch["max_seqlen"] == max(lengths)
    mp = batch["masked_positions"]
    assert mp.dtype == torch.long and (mp == torch.nonzero(batch["labels"] != -100).flatten()).all()
    assert (mp[1:] > mp[:-1]).all()
    # every sample starts with [CLS] and ends with [SEP] in the flat stream
    assert (batch["input_ids"][cu[:-1].long()] == CLS).all() and (batch["input_ids"][cu[1:].long() - 1] == SEP).all()


def test_padded_batch_matches_unpadded():
    samples = make_samples(5, np.random.default_rng(3), min_len=3, max_len=60)
    flat = collator()(samples)
    padded = collator(padded=True)(samples)
    assert list(padded) == ["input_ids", "attention_mask", "labels", "masked_positions"]
    assert torch.equal(padded["masked_positions"], (padded["labels"].flatten() != -100).nonzero().flatten())
    lengths = [len(s["input_ids"]) for s in samples]
    assert padded["input_ids"].shape == padded["labels"].shape == padded["attention_mask"].shape == (5, max(lengths))
    mask = padded["attention_mask"].bool()
    assert mask.sum(1).tolist() == lengths
    assert (padded["input_ids"][~mask] == PAD).all() and (padded["labels"][~mask] == -100).all()
    assert torch.equal(padded["input_ids"][mask], flat["input_ids"])
    assert torch.equal(padded["labels"][mask], flat["labels"])
    fixed = collator(padded=True, pad_to=128)(samples)
    assert fixed["input_ids"].shape == (5, 128) and torch.equal(fixed["labels"][:, : max(lengths)], padded["labels"])
    with pytest.raises(ValueError):
        collator(padded=True, pad_to=8)(samples)


def test_masks_depend_only_on_seed_epoch_and_sample():
    samples = make_samples(64, np.random.default_rng(4))
    full = collator(seed=7)(samples)
    again = collator(seed=7)(samples)
    assert torch.equal(full["input_ids"], again["input_ids"]) and torch.equal(full["labels"], again["labels"])

    def per_sample(batch):
        cu = batch["cu_seqlens"].tolist()
        return [(batch["input_ids"][a:b].tolist(), batch["labels"][a:b].tolist()) for a, b in zip(cu, cu[1:])]

    # other batch make-up, other order: each sample keeps its mask
    reference = per_sample(full)
    order = np.random.default_rng(5).permutation(64)
    for chunk in np.array_split(order, 5):
        part = per_sample(collator(seed=7)([samples[i] for i in chunk]))
        assert part == [reference[i] for i in chunk]

    other_seed = collator(seed=8)(samples)
    assert not torch.equal(full["labels"], other_seed["labels"])
    next_epoch = collator(seed=7)([{**s, "epoch": 1} for s in samples])
    assert not torch.equal(full["labels"], next_epoch["labels"])
    fixed = collator(seed=7, remask_each_epoch=False)([{**s, "epoch": 1} for s in samples])
    assert torch.equal(full["labels"], fixed["labels"]) and torch.equal(full["input_ids"], fixed["input_ids"])


def test_every_batch_with_maskable_tokens_gets_a_masked_token():
    rng = np.random.default_rng(6)
    for i in range(50):
        samples = make_samples(2, rng, min_len=3, max_len=6, first_index=2 * i)
        batch = collator(1e-9)(samples)
        assert len(batch["masked_positions"]) == 1
        pos = int(batch["masked_positions"][0])
        assert batch["labels"][pos] == originals(samples)[pos] and originals(samples)[pos] >= 15
    only_specials = [{"input_ids": np.array([CLS, SEP], np.uint16), "index": 0}]
    assert len(collator(0.5)(only_specials)["masked_positions"]) == 0


def test_from_dataset_info_excludes_specials_and_unused_from_replacements():
    info = {
        "tokenizer": {
            "vocab_size": VOCAB,
            "mask_token_id": MASK,
            "pad_token_id": PAD,
            "special_token_ids": [0, 1, 2, 3, 4],
            "non_replacement_ids": list(range(15)),
        }
    }
    c = MLMCollator.from_dataset_info(info, mlm_probability=0.15, seed=1)
    assert np.array_equal(c.replacement_ids, REPLACEMENT)
    assert c.mlm_probability == 0.15 and c.seed == 1


def test_split_by_tokens_fewest_and_most_even_micro_batches():
    from mosaicbert_ds.data.collator import split_by_tokens

    assert split_by_tokens([100] * 5, 250) == [2, 4, 5]  # 3 micro batches: 200, 200, 100
    assert split_by_tokens([100] * 5, 500) == [5]
    assert split_by_tokens([100, 300, 50, 50, 400, 10], 400) == [2, 4, 5, 6]
    assert split_by_tokens([50, 50, 50, 50, 10], 200) == [2, 5]  # 100 + 110, where greedy alone gives 200 + 10
    assert split_by_tokens([500, 10], 400) == [1, 2]  # a sample over the budget stands alone
    assert split_by_tokens([], 10) == []
    rng = np.random.default_rng(0)
    for _ in range(200):
        lengths = rng.integers(1, 129, rng.integers(1, 40)).tolist()
        budget = int(rng.integers(128, 1024))
        ends = split_by_tokens(lengths, budget)
        groups = [lengths[a:b] for a, b in zip([0, *ends[:-1]], ends)]
        assert [n for g in groups for n in g] == lengths and all(0 < sum(g) <= budget for g in groups)
        fewest, used = 1, 0
        for n in lengths:
            fewest, used = (fewest + 1, n) if used + n > budget else (fewest, used + n)
        assert len(groups) == fewest


def test_token_budget_collator_masks_as_one_batch():
    from mosaicbert_ds.data.collator import TokenBudgetCollator

    samples = make_samples(40, np.random.default_rng(3))
    whole = collator()(samples)
    micro = TokenBudgetCollator(collator(), 512)(samples)
    assert len(micro) > 1 and all(m["input_ids"].numel() <= 512 for m in micro)
    for key in ("input_ids", "labels"):
        assert torch.equal(torch.cat([m[key] for m in micro]), whole[key])


def test_packed_rows_become_one_sequence_each():
    rng = np.random.default_rng(4)
    docs = make_samples(6, rng, max_len=40)
    rows = [
        {"input_ids": np.concatenate([d["input_ids"] for d in docs[:4]]), "index": 0, "epoch": 0},
        {"input_ids": np.concatenate([d["input_ids"] for d in docs[4:]]), "index": 1, "epoch": 0},
    ]
    rows[0]["doc_lengths"] = np.array([len(d["input_ids"]) for d in docs[:4]])
    rows[1]["doc_lengths"] = np.array([len(d["input_ids"]) for d in docs[4:]])
    batch = collator()(rows)
    cu = batch["cu_seqlens"]
    assert batch["samples"] == 2 and (cu[1:] - cu[:-1]).tolist() == [len(d["input_ids"]) for d in docs]
    assert batch["max_seqlen"] == max(len(d["input_ids"]) for d in docs)
    unpacked = {k: v for k, v in collator()([{**r, "doc_lengths": None} for r in rows]).items()}
    assert torch.equal(batch["labels"], unpacked["labels"])  # masks are per stored sample
    padded = collator(padded=True)(rows)
    assert padded["input_ids"].shape == (6, batch["max_seqlen"]) and padded["samples"] == 2
    assert torch.equal(padded["labels"][padded["attention_mask"].bool()], batch["labels"])
    rows[1]["doc_lengths"] = np.array([3])
    with pytest.raises(ValueError, match="sequences summing to 3"):
        collator()(rows)
