"""`mosaicbert-ds tokenizer`: train an uncased BERT WordPiece tokenizer on local text.

    mosaicbert-ds tokenizer corpus/*.txt --vocab-size 30522 --out ./tokenizer
    mosaicbert-ds tokenizer notes.jsonl.gz --text-field body --vocab-size 8192 --out ./tok

The paper's conclusion recommends domain-specific tokenizers; the quickstart also needs one
because bert-base-uncased cannot be downloaded offline. The result is bert-base-uncased's
recipe: BertNormalizer (lowercase, strip accents, clean text, split CJK), BertPreTokenizer,
WordPiece with `##` continuations, [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4 and the BERT
post-processor. The vocabulary size is rounded up to a multiple of 64 (tensor-core friendly
embedding rows); if the corpus is too small to fill it, `[unusedN]` entries pad it, as in
BERT's own vocabulary. The folder loads offline with AutoTokenizer.from_pretrained. `--out` is
checked before training and written whole (outputs.output_folder): an empty or new folder, or an
earlier tokenizer output holding nothing the user added.
WordPiece training is not bit-for-bit deterministic, so keep the folder you trained with.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

from ..errors import UserError
from ..outputs import output_folder
from .sources import DocumentSource, SourceConfig

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def round_vocab_size(size: int, multiple: int = 64) -> int:
    """Round up to a multiple of 64, so embedding matrices tile evenly."""
    return -(-size // multiple) * multiple


def train_tokenizer(
    texts: Iterable[str],
    out_dir: str | Path,
    vocab_size: int = 30522,
    min_frequency: int = 2,
    show_progress: bool = False,
) -> Path:
    """Train a WordPiece tokenizer on `texts` and save it as a BERT fast-tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast

    size = round_vocab_size(vocab_size)
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]", continuing_subword_prefix="##"))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(
        vocab_size=size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        continuing_subword_prefix="##",
        show_progress=show_progress,
    )
    tok.train_from_iterator(texts, trainer)
    vocab = tok.get_vocab()
    if len(vocab) <= len(SPECIAL_TOKENS):
        raise UserError("the corpus has no text to learn a vocabulary from")
    if len(vocab) < size:  # small corpus: pad with never-produced entries, as BERT's vocab does
        unused = (f"[unused{i}]" for i in range(size))
        for token in unused:
            if len(vocab) == size:
                break
            vocab.setdefault(token, len(vocab))
        tok.model = models.WordPiece(vocab=vocab, unk_token="[UNK]", continuing_subword_prefix="##")
    tok.post_processor = processors.BertProcessing(("[SEP]", vocab["[SEP]"]), ("[CLS]", vocab["[CLS]"]))

    out = Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        # Loading from tokenizer.json (rather than passing the object) works the same way in
        # transformers 4 (BertTokenizerFast) and 5 (where BertTokenizerFast is BertTokenizer).
        tok.save(f"{tmp}/tokenizer.json")
        wrapped = BertTokenizerFast.from_pretrained(
            tmp,
            do_lower_case=True,
            model_max_length=512,
            **dict(zip(("pad_token", "unk_token", "cls_token", "sep_token", "mask_token"), SPECIAL_TOKENS)),
        )
    wrapped.save_pretrained(str(out))
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "examples:\n"
        "    mosaicbert-ds tokenizer corpus/*.txt --vocab-size 30522 --out ./tokenizer\n"
        "    mosaicbert-ds tokenizer notes.jsonl.gz --text-field body --vocab-size 8192 --out ./tok"
    )
    parser.add_argument("inputs", nargs="+", metavar="FILE_OR_GLOB", help="text, JSONL or Parquet files")
    parser.add_argument("--out", required=True, help="folder to save the tokenizer in")
    parser.add_argument("--vocab-size", type=int, default=30522, help="rounded up to a multiple of 64 (default: 30522)")
    parser.add_argument("--min-frequency", type=int, default=2, help="minimum count of a merged piece (default: 2)")
    parser.add_argument("--text-field", default="text", help="JSONL field / Parquet column (default: text)")
    parser.add_argument("--format", default="auto", choices=["auto", "text", "jsonl", "parquet"])
    parser.add_argument("--text-unit", default="line", choices=["line", "paragraph"])
    parser.add_argument("--on-bad-utf8", default="fail", choices=["fail", "skip"])
    parser.add_argument("--clean", action="store_true", help="drop box-drawing lines, collapse whitespace")


def main(args: argparse.Namespace) -> int:
    if args.vocab_size < len(SPECIAL_TOKENS) + 1:
        raise UserError(f"--vocab-size must be larger than {len(SPECIAL_TOKENS)}")
    source = DocumentSource(
        SourceConfig(
            paths=list(args.inputs),
            text_field=args.text_field,
            format=args.format,
            text_unit=args.text_unit,
            on_bad_utf8=args.on_bad_utf8,
            clean=args.clean,
        )
    )
    out = Path(args.out)
    with output_folder(out, kind="tokenizer") as tmp:  # checked and locked before training
        train_tokenizer(source, tmp, args.vocab_size, args.min_frequency, show_progress=sys.stderr.isatty())
    stats = source.stats
    size = round_vocab_size(args.vocab_size)
    print(
        f"trained a {size}-token WordPiece vocabulary on {stats.documents:,} documents "
        f"({stats.bad_utf8:,} skipped as not UTF-8); saved to {out}"
    )
    return 0
