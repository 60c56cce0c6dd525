"""What a pretrained model learned, shown on held-out text beside the unigram's guesses.

The quickstart's summary masks one word in each of the first samples of the dataset's val/ split
(storage order) and prints, for the first few, the model's top predictions beside those of token
frequencies alone (the unigram, which ignores the context and always answers the same), and over
all of them how often each ranks the right word first or in its top 5, and its median rank. The masked word is
chosen by a fixed rule, not by hand: the first whole word (one token, no `##` piece before or
after it) of at least three letters at or after the `start`-th token of the sample.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import torch


def pick_position(tokens: list[str], start: int = 8) -> int | None:
    """The rule: first whole word of at least 3 letters at or after `start` (None if there is none)."""
    for i in range(start, len(tokens) - 1):  # the last token is [SEP]
        t = tokens[i]
        whole = not t.startswith("##") and not tokens[i + 1].startswith("##")
        if whole and len(t) >= 3 and t.isalpha():
            return i
    return None


def _words(tokens: list[str]) -> str:
    return " ".join(tokens).replace(" ##", "")


def held_out_predictions(
    model_dir: str | Path, data: str | Path, n: int = 4, samples: int = 64, top: int = 5
) -> dict[str, Any]:
    """Model and unigram predictions for one masked word in each of the first `samples` usable
    val samples (one batch); the first `n` are kept as examples.

    Returns {"unigram_top": its `top` tokens, "rows": the examples ({"context", "answer",
    "model_top", "model_rank", "unigram_rank"}; ranks are 1-based positions of the right token),
    "stats": {"words", "model_top1", "model_top5", "unigram_top1", "unigram_top5",
    "model_median_rank", "unigram_median_rank"} over all of them}."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    import mosaicbert_ds  # noqa: F401  (Auto class registration)

    from .data.unigram import read_samples, split_counts

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForMaskedLM.from_pretrained(model_dir).eval()
    vocab = model.config.vocab_size
    train = torch.as_tensor(split_counts(data, "train")[:vocab], dtype=torch.float64)
    freq = torch.zeros(vocab, dtype=torch.float64)
    freq[: len(train)] = train
    unigram_order = freq.argsort(descending=True, stable=True)
    unigram_rank = torch.empty_like(unigram_order)
    unigram_rank[unigram_order] = torch.arange(1, vocab + 1)

    picked = []  # (token ids, position)
    for sample in read_samples(data, "val"):
        ids = [int(i) for i in sample]
        pos = pick_position(tok.convert_ids_to_tokens(ids))
        if pos is not None:
            picked.append((ids, pos))
        if len(picked) == samples:
            break
    if not picked:
        return {"unigram_top": tok.convert_ids_to_tokens(unigram_order[:top].tolist()), "rows": [], "stats": None}
    width = max(len(ids) for ids, _ in picked)
    inputs = torch.full((len(picked), width), tok.pad_token_id)
    mask = torch.zeros_like(inputs)
    for i, (ids, pos) in enumerate(picked):
        inputs[i, : len(ids)] = torch.tensor(ids)
        inputs[i, pos] = tok.mask_token_id
        mask[i, : len(ids)] = 1
    with torch.no_grad():
        logits = model(inputs, attention_mask=mask).logits[:, :, :vocab]
    rows, model_ranks, unigram_ranks = [], [], []
    for i, (ids, pos) in enumerate(picked):
        order = logits[i, pos].argsort(descending=True)
        model_ranks.append(int((order == ids[pos]).nonzero()[0, 0]) + 1)
        unigram_ranks.append(int(unigram_rank[ids[pos]]))
        if len(rows) < n:
            tokens = tok.convert_ids_to_tokens(ids)
            left = tokens[max(1, pos - 12) : pos]
            right = tokens[pos + 1 : min(len(tokens) - 1, pos + 5)]
            rows.append(
                {
                    "context": f"... {_words(left)} [MASK] {_words(right)} ...",
                    "answer": tokens[pos],
                    "model_top": tok.convert_ids_to_tokens(order[:top].tolist()),
                    "model_rank": model_ranks[-1],
                    "unigram_rank": unigram_ranks[-1],
                }
            )

    def share(ranks: list[int], k: int) -> int:
        return sum(r <= k for r in ranks)

    stats = {
        "words": len(picked),
        "model_top1": share(model_ranks, 1),
        "model_top5": share(model_ranks, 5),
        "unigram_top1": share(unigram_ranks, 1),
        "unigram_top5": share(unigram_ranks, 5),
        "model_median_rank": statistics.median(model_ranks),
        "unigram_median_rank": statistics.median(unigram_ranks),
    }
    return {"unigram_top": tok.convert_ids_to_tokens(unigram_order[:top].tolist()), "rows": rows, "stats": stats}


def format_predictions(result: dict[str, Any], indent: str = "  ") -> list[str]:
    """The summary's lines for `held_out_predictions`."""
    lines = [
        f"{indent}held-out words     one word masked in each val sample (rule: the first whole word of 3+ "
        "letters from the 8th token on)",
        f"{indent}                   the unigram ignores the context and always answers: "
        f"{', '.join(result['unigram_top'])}",
    ]
    for row in result["rows"]:
        lines += [
            f"{indent}  {row['context']}",
            f"{indent}    answer {row['answer']!r}: model {', '.join(row['model_top'])} (answer ranked "
            f"{row['model_rank']}; unigram ranks it {row['unigram_rank']})",
        ]
    st = result["stats"]
    if st:
        lines.append(
            f"{indent}  over the first {st['words']} val samples: model right first {st['model_top1']} times, in its "
            f"top 5 {st['model_top5']}, median rank {st['model_median_rank']:g}; unigram {st['unigram_top1']}, "
            f"{st['unigram_top5']}, {st['unigram_median_rank']:g}"
        )
    return lines
