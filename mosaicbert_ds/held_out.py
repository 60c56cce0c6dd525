"""What a pretrained model learned, shown on held-out text beside the unigram's guesses.

The quickstart's summary masks one word in each of the first few samples of the dataset's val/
split (storage order) and prints the model's top predictions beside those of token frequencies
alone (the unigram, which ignores the context and always answers the same). The masked word is
chosen by a fixed rule, not by hand: the first whole word (one token, no `##` piece before or
after it) of at least three letters at or after the `start`-th token of the sample.
"""

from __future__ import annotations

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


def held_out_predictions(model_dir: str | Path, data: str | Path, n: int = 4, top: int = 5) -> dict[str, Any]:
    """Model and unigram predictions for one masked word in each of the first `n` usable val samples.

    Returns {"unigram_top": [tokens], "unigram_accuracy": share of val tokens that are the most
    frequent train token, "rows": [{"context", "answer", "model_top", "model_rank", "unigram_rank"}]};
    ranks are 1-based positions of the right token in each one's ordering."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    import mosaicbert_ds  # noqa: F401  (Auto class registration)

    from .data.unigram import read_samples, split_counts

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForMaskedLM.from_pretrained(model_dir).eval()
    train = torch.as_tensor(split_counts(data, "train"), dtype=torch.float64)
    held = torch.as_tensor(split_counts(data, "val"), dtype=torch.float64)
    vocab = model.config.vocab_size
    freq = torch.zeros(vocab, dtype=torch.float64)
    freq[: len(train)] = train[:vocab]
    unigram_order = freq.argsort(descending=True)
    unigram_rank = torch.empty_like(unigram_order)
    unigram_rank[unigram_order] = torch.arange(1, vocab + 1)
    best = int(unigram_order[0])
    rows = []
    for sample in read_samples(data, "val"):
        if len(rows) == n:
            break
        ids = [int(i) for i in sample]
        tokens = tok.convert_ids_to_tokens(ids)
        pos = pick_position(tokens)
        if pos is None:
            continue
        masked = torch.tensor([ids[:pos] + [tok.mask_token_id] + ids[pos + 1 :]])
        with torch.no_grad():
            logits = model(masked, attention_mask=torch.ones_like(masked)).logits[0, pos, :vocab]
        order = logits.argsort(descending=True)
        left = tokens[max(1, pos - 12) : pos]
        right = tokens[pos + 1 : min(len(tokens) - 1, pos + 5)]
        rows.append(
            {
                "context": f"... {_words(left)} [MASK] {_words(right)} ...",
                "answer": tokens[pos],
                "model_top": tok.convert_ids_to_tokens(order[:top].tolist()),
                "model_rank": int((order == ids[pos]).nonzero()[0, 0]) + 1,
                "unigram_rank": int(unigram_rank[ids[pos]]),
            }
        )
    return {
        "unigram_top": tok.convert_ids_to_tokens(unigram_order[:top].tolist()),
        "unigram_accuracy": float(held[best] / held.sum()) if best < len(held) and held.sum() else 0.0,
        "rows": rows,
    }


def format_predictions(result: dict[str, Any], indent: str = "  ") -> list[str]:
    """The summary's lines for `held_out_predictions`."""
    lines = [
        f"{indent}held-out words     one word masked in each of the first val samples (rule: first whole "
        "word of 3+ letters from the 8th token on)",
        f"{indent}                   the unigram ignores the context and always answers: "
        f"{', '.join(result['unigram_top'])}",
    ]
    for row in result["rows"]:
        lines += [
            f"{indent}  {row['context']}",
            f"{indent}    answer {row['answer']!r}: model {', '.join(row['model_top'])} (answer ranked "
            f"{row['model_rank']}; unigram ranks it {row['unigram_rank']})",
        ]
    return lines
