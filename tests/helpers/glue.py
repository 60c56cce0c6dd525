"""Shared helpers for the GLUE tests: fixture paths, a tiny WordPiece tokenizer and tiny models."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

from mosaicbert_ds import MosaicBertConfig, MosaicBertForMaskedLM

FIXTURES = Path(__file__).resolve().parents[1] / "data" / "glue"
TSV = FIXTURES / "tsv"
JSONL = FIXTURES / "jsonl"
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def fixture_vocab() -> list[str]:
    """Special tokens, then every word and punctuation mark of the fixture files."""
    words: set[str] = set()
    for path in FIXTURES.rglob("*"):
        if path.suffix in (".tsv", ".jsonl"):
            words.update(re.findall(r"[a-z0-9]+|[^\sa-z0-9]", path.read_text(encoding="utf-8").lower()))
    return SPECIALS + sorted(words)


def make_tokenizer(folder: Path, extra_words: int = 0) -> BertTokenizerFast:
    folder.mkdir(parents=True, exist_ok=True)
    vocab = fixture_vocab() + [f"extra{i}" for i in range(extra_words)]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tok = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)
    tok.save_pretrained(str(folder))
    return tok


def make_mosaic_model(folder: Path, seed: int = 0, vocab_size: int | None = None) -> Path:
    """A tiny MosaicBERT MLM model with its tokenizer, as the exporter would leave it."""
    tok = make_tokenizer(folder)
    torch.manual_seed(seed)
    config = MosaicBertConfig.from_name(
        "tiny", vocab_size=vocab_size or len(tok), attention_impl="torch", fused_ops=False
    )
    MosaicBertForMaskedLM(config).save_pretrained(str(folder))
    return folder


def make_bert_model(folder: Path, seed: int = 0) -> Path:
    """A tiny plain Hugging Face BERT (the baseline's architecture) with the same tokenizer."""
    tok = make_tokenizer(folder)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=300,
    )
    BertForMaskedLM(config).save_pretrained(str(folder))
    return folder


def make_trainer_checkpoint(
    run_dir: Path, step: int, train_seconds: float, seed: int = 0, vocab_size: int | None = None
) -> Path:
    """A run's checkpoints/ folder in the trainer's layout (ZeRO stage 0, one rank): what
    `mosaicbert_ds.train.export.export_checkpoint` reads."""
    root = run_dir / "checkpoints"
    tag = f"step_{step:07d}"
    (root / tag).mkdir(parents=True)
    tok = make_tokenizer(root / "tokenizer")
    torch.manual_seed(seed)
    config = MosaicBertConfig.from_name(
        "tiny", vocab_size=vocab_size or len(tok), attention_impl="torch", fused_ops=False
    )
    config.to_json_file(str(root / "model_config.json"))
    torch.save({"module": MosaicBertForMaskedLM(config).state_dict()}, root / tag / "mp_rank_00_model_states.pt")
    (root / tag / "trainer_state.json").write_text(json.dumps({"step": step, "train_seconds": train_seconds}))
    from mosaicbert_ds.train.checkpoint import mark_complete

    mark_complete(root, tag, 1)  # written last, as the trainer does
    (root / "latest").write_text(tag)
    return root
