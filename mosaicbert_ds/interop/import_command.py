"""`mosaicbert-ds import SRC OUT`: a BERT or MosaicBERT folder as this project's model folder.

SRC is transformers' BERT (BertForMaskedLM, BertForPreTraining or BertModel) or the paper
authors' MosaicBERT (mosaicml/mosaic-bert-base); the layout is recognised from the weights.
OUT loads with MosaicBertForMaskedLM.from_pretrained and gives the source's logits; the
tokenizer files are copied beside it. Anything that does not convert exactly is refused.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..outputs import output_folder
from .folder import read_model_folder, write_model_folder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "examples:\n"
        "    mosaicbert-ds import path/to/bert-base-uncased runs/bert-import\n"
        "    mosaicbert-ds import path/to/mosaic-bert-base runs/mosaic-import"
    )
    parser.add_argument("src", help="a transformers folder: BERT or the authors' MosaicBERT")
    parser.add_argument("out", help="output folder (this project's model folder)")


def import_folder(src: str | Path, out: str | Path) -> list[str]:
    """Convert `src` into `out`; returns the notes (what was filled in or dropped). `out` is
    checked and locked (outputs.output_folder) before the weights are read."""
    with output_folder(out, kind="import", sources=[src]) as tmp:
        model = read_model_folder(src)
        write_model_folder(model, tmp, tokenizer_from=Path(src))
    return [f"layout {model.layout}", *model.notes]


def main(args: argparse.Namespace) -> int:
    notes = import_folder(args.src, args.out)
    print(f"imported {args.src} -> {args.out} ({'; '.join(notes)})")
    return 0
