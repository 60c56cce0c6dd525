"""Throughput of `mosaicbert-ds convert` against the number of writer processes, on the CPU.

    python -m benchmarks.convert --docs 4000 --writers 1 2 --out benchmarks/results/cpu_<date>
    mosaicbert-ds bench convert --docs 200000 --writers 1 8 16 32 64 --tokenizer ./bert-base-uncased

Input: C4-like documents (paragraphs of the bundled Jargon File joined to at least --doc-chars
characters; C4-en averages about 2,200 bytes of text per document) written as JSONL. Tokenizer:
--tokenizer, or a 30,522-entry WordPiece (BERT's vocabulary size) trained on the same corpus.
Each writer count converts the same file into a fresh folder (train/val split, 128 tokens,
truncation, hashes, merge: the first 1% of documents held out, the whole command) and is timed
end to end, including start-up.

It reports documents/s and tokens/s (content tokens before truncation: what the tokenizer
processes), per writer and per core, and estimates the wall-clock for C4-en from the best
per-core rate. A row's per-core rate divides by the writers or the usable cores, whichever is
more: the Rust tokenizer runs its own threads, so fewer writers than cores still use every core.
The C4-en figures:
365M documents (the paper's 286.72M samples are "78% of C4") and about 156B tokens (Dodge et al.
2021, Table 1; that is not a BERT WordPiece count). The token-based estimate scales the measured
tokenizer cost by text volume and is the one to plan with; the document-based one is shown for
comparison. Parallel efficiency on many cores is assumed to be --efficiency (reading and
per-block merging are serial in the main process): measure on the target node to replace it.

Writes convert.json (figures, command line, git commit and dirty flag, software versions) and
convert.md (the table) to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

C4_DOCUMENTS = 365_000_000
C4_TOKENS = 156_000_000_000


def provenance() -> dict:
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True).stdout.strip()

    import numpy
    import streaming
    import tokenizers
    import transformers

    return {
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain")),
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.convert", *sys.argv[1:]]),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_cores_usable": len(os.sched_getaffinity(0)),
        # other processes on the machine slow every writer: read the rates against this
        "load_average_1m_at_start": round(os.getloadavg()[0], 2),
        "versions": {
            "mosaicml-streaming": streaming.__version__,
            "tokenizers": tokenizers.__version__,
            "transformers": transformers.__version__,
            "numpy": numpy.__version__,
        },
    }


def corpus_paragraphs() -> list[str]:
    from mosaicbert_ds.data import SourceConfig, bundled_corpus_path
    from mosaicbert_ds.data.sources import DocumentSource

    return list(
        DocumentSource(SourceConfig(paths=[str(bundled_corpus_path())], text_unit="paragraph", clean=True, min_words=4))
    )


def write_corpus(path: Path, paragraphs: list[str], n_docs: int, doc_chars: int) -> int:
    chars, i = 0, 0
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n_docs):
            parts: list[str] = []
            while sum(map(len, parts)) < doc_chars:
                parts.append(paragraphs[i % len(paragraphs)])
                i += 1
            doc = "\n\n".join(parts)
            chars += len(doc)
            f.write(json.dumps({"text": doc}) + "\n")
    return chars


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=4000, help="documents in the input (default: 4000)")
    parser.add_argument("--doc-chars", type=int, default=2000, help="minimum characters per document")
    parser.add_argument("--writers", type=int, nargs="+", default=[1, 2], help="writer counts to time")
    parser.add_argument("--block-docs", type=int, default=512, help="documents per block (default: 512)")
    parser.add_argument("--tokenizer", help="tokenizer folder or name (default: WordPiece 30522 on the corpus)")
    parser.add_argument(
        "--cores",
        type=int,
        nargs="+",
        default=[64, 8 * 64],
        help="core counts to estimate C4-en for (default: 64 = one node, 512 = 8 nodes)",
    )
    parser.add_argument(
        "--efficiency", type=float, default=0.8, help="assumed parallel efficiency at those core counts (default: 0.8)"
    )
    parser.add_argument("--out", required=True, help="folder for convert.json and convert.md")
    args = parser.parse_args(argv)

    from mosaicbert_ds.data import ConvertConfig, SourceConfig, convert_corpus, train_tokenizer

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paragraphs = corpus_paragraphs()
        tokenizer = args.tokenizer or str(train_tokenizer(paragraphs, tmp / "tok", vocab_size=30522))
        src = tmp / "docs.jsonl"
        chars = write_corpus(src, paragraphs, args.docs, args.doc_chars)
        for writers in args.writers:
            started = time.perf_counter()
            index = convert_corpus(
                ConvertConfig(
                    source=SourceConfig(paths=[str(src)]),
                    out=str(tmp / f"w{writers}"),
                    tokenizer=tokenizer,
                    workers=writers,
                    block_docs=args.block_docs,
                    val_docs=max(1, args.docs // 100),
                    progress=False,
                )
            )
            seconds = time.perf_counter() - started
            tokens = index["tokens_kept"] + index["tokens_dropped"]
            rows.append(
                {
                    "writers": writers,
                    "seconds": round(seconds, 3),
                    "documents": index["documents"],
                    "tokens": tokens,
                    "docs_per_s": round(index["documents"] / seconds, 1),
                    "tokens_per_s": round(tokens / seconds, 1),
                    "docs_per_s_per_writer": round(index["documents"] / seconds / writers, 1),
                    "tokens_per_s_per_writer": round(tokens / seconds / writers, 1),
                    "docs_per_s_per_core": round(index["documents"] / seconds / max(writers, cores), 1),
                    "tokens_per_s_per_core": round(tokens / seconds / max(writers, cores), 1),
                }
            )
    best_doc = max(r["docs_per_s_per_core"] for r in rows)
    best_tok = max(r["tokens_per_s_per_core"] for r in rows)
    estimates = [
        {
            "cores": c,
            "hours_from_tokens": round(C4_TOKENS / (best_tok * c * args.efficiency) / 3600, 2),
            "hours_from_documents": round(C4_DOCUMENTS / (best_doc * c * args.efficiency) / 3600, 2),
        }
        for c in args.cores
    ]
    result = {
        "benchmark": "convert",
        **provenance(),
        "input": {
            "documents": args.docs,
            "characters": chars,
            "chars_per_doc": round(chars / args.docs),
            "tokens_per_doc": round(rows[0]["tokens"] / args.docs, 1),
            "tokenizer": args.tokenizer or "WordPiece 30522 trained on the bundled Jargon File",
            "block_docs": args.block_docs,
        },
        "rows": rows,
        "c4_en": {
            "documents": C4_DOCUMENTS,
            "tokens": C4_TOKENS,
            "efficiency": args.efficiency,
            "estimates": estimates,
        },
    }
    (out / "convert.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# convert throughput ({result['platform']}, {result['cpu_cores_usable']} usable cores, "
        f"load average {result['load_average_1m_at_start']} at start)",
        "",
        f"Command: `{result['command']}`  ",
        f"Commit: {result['git_commit']}" + (" (dirty)" if result["git_dirty"] else ""),
        "",
        f"Input: {args.docs} documents, {result['input']['chars_per_doc']} characters and "
        f"{result['input']['tokens_per_doc']} tokens per document; tokenizer: {result['input']['tokenizer']}.",
        "",
        "| writers | seconds | documents/s | tokens/s | documents/s per writer | tokens/s per writer "
        "| tokens/s per core |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['writers']} | {r['seconds']:.2f} | {r['docs_per_s']:,.0f} | {r['tokens_per_s']:,.0f} | "
        f"{r['docs_per_s_per_writer']:,.0f} | {r['tokens_per_s_per_writer']:,.0f} | {r['tokens_per_s_per_core']:,.0f} |"
        for r in rows
    ]
    lines += [
        "",
        f"C4-en estimate ({C4_DOCUMENTS / 1e6:.0f}M documents, ~{C4_TOKENS / 1e9:.0f}B tokens, "
        f"parallel efficiency {args.efficiency} assumed):",
        "",
        "| cores | hours (from tokens/s) | hours (from documents/s) |",
        "|---:|---:|---:|",
    ]
    lines += [f"| {e['cores']} | {e['hours_from_tokens']:.1f} | {e['hours_from_documents']:.1f} |" for e in estimates]
    (out / "convert.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
