"""`mosaicbert-ds`: one console script, one subcommand per job.

Each subcommand lives in its own module, imported only when it runs, and exposes
`add_arguments(parser)` and `main(args) -> int`. Errors that are the user's (bad files, bad
configs, missing data) are raised as `UserError` and printed as one line with exit code 2; an output
that cannot be written (disk full, I/O error) is an `OutputError`: one line, exit code 5.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from mosaicbert_ds.errors import UserError  # absolute: cli may run as __main__
from mosaicbert_ds.train.distributed import take_local_rank_arg

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "tokenizer": ("mosaicbert_ds.data.tokenizer", "train a WordPiece tokenizer on a text corpus"),
    "convert": ("mosaicbert_ds.data.convert", "tokenize text into MDS shards for pretraining"),
    "pretrain": ("mosaicbert_ds.train.pretrain", "pretrain with DeepSpeed (one CPU, one GPU or many nodes)"),
    "import": ("mosaicbert_ds.interop.import_command", "convert a BERT or MosaicBERT folder into this format"),
    "export": ("mosaicbert_ds.train.export", "turn a training checkpoint into a transformers folder"),
    "eval-mlm": ("mosaicbert_ds.train.eval_mlm", "held-out MLM loss of a model by position (0-127, 128-511, ...)"),
    "finetune-glue": ("mosaicbert_ds.glue.finetune", "finetune a checkpoint on GLUE and report the average"),
    "pareto": ("mosaicbert_ds.glue.pareto", "GLUE average vs pretraining hours for several checkpoints"),
    "bench": ("mosaicbert_ds.benchmarks.bench", "throughput, MFU, ablation and scaling reports"),
    "quickstart": ("mosaicbert_ds.quickstart", "convert the bundled corpus, pretrain, export, summarise"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mosaicbert-ds", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:  # the deepspeed launcher without --no_local_rank adds --local_rank=N before the command
        argv = take_local_rank_arg(list(sys.argv[1:] if argv is None else argv))
    except UserError as err:
        print(f"mosaicbert-ds: error: {err}", file=sys.stderr)
        return 2
    if not argv or argv[0] not in COMMANDS:
        parser = build_parser()
        if argv and not argv[0].startswith("-"):
            parser.error(f"unknown command {argv[0]!r}; choose one of {', '.join(COMMANDS)}")
        parser.print_help()
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    name, rest = argv[0], argv[1:]
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"mosaicbert-ds {name}", description=COMMANDS[name][1])
    module.add_arguments(parser)
    # key=value overrides may follow options (`pretrain RUN --dry-run a=b`): parse them intermixed,
    # except where a command forwards its remaining arguments (REMAINDER cannot be intermixed)
    remainder = any(a.nargs == argparse.REMAINDER for a in parser._actions)
    args = parser.parse_args(rest) if remainder else parser.parse_intermixed_args(rest)
    try:
        return int(module.main(args) or 0)
    except UserError as err:
        print(f"mosaicbert-ds {name}: error: {err}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
