"""Build the convergence benchmark's corpus: English documentation prose from three Debian packages.

    python -m benchmarks.prose_corpus --out runs/prose          # text, tokenizer and MDS dataset

What it takes (each package fetched with `apt-get download`, unpacked with `dpkg-deb -x`; nothing
is installed):

| package        | text                                                 | licence                      |
| -------------- | ---------------------------------------------------- | ---------------------------- |
| python3.11-doc | the Python 3.11 documentation, reST sources          | PSF License Version 2        |
| perl-doc       | the Perl 5.36 manual (perl*.pod)                     | GPL-1+ or Artistic (Perl's)  |
| linux-doc-6.1  | the Linux 6.1 kernel's Documentation/ (reST sources) | GPL-2.0 (a few files dual)   |
| postgresql-doc-15 | the PostgreSQL 15 manual (HTML)                   | PostgreSQL Licence           |
| bible-kjv-text | the King James Bible (read by bible-kjv's program)   | public domain                |
| manpages(-dev) | the Linux man-pages project (roff)                   | per page, free (see copyright)|

Markup is reduced to its words: code blocks (indented or after `::`), directives, heading rules,
tables and POD commands are dropped; inline roles and formatting codes keep their text. One
document per source file, written as JSONL (`corpus.jsonl.gz`); `convert --split-long` then cuts
each document into full 128-token samples. About 8.1 million words, over 10 million WordPiece tokens.

Steps (each skipped when its output exists): fetch+extract -> corpus.jsonl.gz -> tokenizer/
(WordPiece 30522 -> 30528, trained on this corpus, or `--tokenizer DIR`) -> mds/ (train, val: 2% of
documents). Tokenizer training is not reproducible bit for bit (tokenizers breaks count ties in
hash-map order), so to rebuild a corpus with the ids of an earlier one (a loss-curve reference
records its vocabulary's hash), pass that build's `mds/tokenizer` as `--tokenizer`.
`--text-only` stops after the JSONL file (the small file to carry to a machine without apt).
"""

from __future__ import annotations

import argparse
import gzip
import html.parser
import json
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from mosaicbert_ds.errors import UserError

PACKAGES = {
    "python3.11-doc": ("usr/share/doc/python3.11/html/_sources", "*.rst.txt"),
    "perl-doc": ("usr/share/perl", "*.pod"),
    "linux-doc-6.1": ("usr/share/doc/linux-doc-6.1/Documentation", "*.rst.gz"),
    "postgresql-doc-15": ("usr/share/doc/postgresql-doc-15/html", "*.html"),
    "bible-kjv-text": ("usr/lib", "bible.data"),
    "manpages": ("usr/share/man", "*.[0-9]*.gz"),
    "manpages-dev": ("usr/share/man", "*.[0-9]*.gz"),
}
# the reader program for bible-kjv-text's compressed data (run from its unpacked package)
HELPERS = ["bible-kjv"]

_RULE = re.compile(r"^\s*([=\-~^\"'`#*+_.:])\1{2,}\s*$")  # reST heading under/overlines
_TABLE = re.compile(r"^\s*[+|]")  # grid tables
_ROLE = re.compile(r":[\w:+-]+:`([^`<]*?)(?:\s*<[^>]*>)?`")  # :func:`name <target>` -> name
_LITERAL = re.compile(r"``([^`]*)``")
_LINK = re.compile(r"`([^`<]*?)\s*<[^>]*>`_+")  # `text <url>`_ -> text
_REF = re.compile(r"`([^`]+)`_*")
_POD_CODE = re.compile(r"[A-Z]<+\s*([^<>]*?)\s*>+")  # C<x>, B<< x >>, L<text|target>


def _paragraphs(text: str) -> Iterator[list[str]]:
    block: list[str] = []
    for line in text.splitlines():
        if line.strip():
            block.append(line)
        elif block:
            yield block
            block = []
    if block:
        yield block


_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+(?:\|[^|]*\|\s+)?([\w:-]+)::")
# directives whose body is code, markup or a listing, not prose
_CODE_DIRECTIVES = {
    "code-block",
    "code",
    "sourcecode",
    "literalinclude",
    "doctest",
    "testcode",
    "testoutput",
    "testsetup",
    "testcleanup",
    "productionlist",
    "highlight",
    "toctree",
    "index",
    "image",
    "figure",
    "raw",
    "kernel-doc",
    "kernel-abi",
    "kernel-feat",
    "include",
    "csv-table",
    "list-table",
    "table",
    "flat-table",
    "math",
    "graphviz",
    "only",
    "cfunction",
    "c:macro",
    "tabularcolumns",
    "contents",
    "sectionauthor",
    "moduleauthor",
    "opcode",
    "cmdoption",
    "option",
    "envvar",
    "describe",
    "audit-event",
    "impl-detail",
    "literal",
    "parsed-literal",
}


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def rst_to_text(text: str) -> str:
    """The prose paragraphs of a reST file: no code, code-like directives, tables or heading rules.

    Prose inside directives (function descriptions, notes, warnings) is kept; a paragraph indented
    under a `::` paragraph or a code directive, a doctest and a comment are dropped."""
    out = []
    skip_deeper = None  # drop blocks indented deeper than this (the body of code or a comment)
    for block in _paragraphs(text):
        first = block[0]
        indent = _indent(first)
        if skip_deeper is not None:
            if indent > skip_deeper:
                continue
            skip_deeper = None
        directive = _DIRECTIVE.match(first)
        if directive:
            if directive.group(2) in _CODE_DIRECTIVES:
                skip_deeper = indent
                continue
            block = [ln for ln in block if not ln.lstrip().startswith(".. ") and not ln.lstrip().startswith(":")]
            if not block:
                continue
        elif first.lstrip().startswith(".."):
            skip_deeper = indent  # a comment, target or substitution definition and its body
            continue
        if first.lstrip().startswith(">>>") or _TABLE.match(first):
            continue
        if block[-1].rstrip().endswith("::"):
            skip_deeper = indent  # the literal block that follows is code
        lines = [ln.strip() for ln in block if not _RULE.match(ln) and not _TABLE.match(ln)]
        para = " ".join(ln for ln in lines if ln)
        para = _ROLE.sub(r"\1", para)
        para = _LITERAL.sub(r"\1", para)
        para = _LINK.sub(r"\1", para)
        para = _REF.sub(r"\1", para).replace("::", ":").replace("**", "")
        if len(para.split()) >= 4:
            out.append(para)
    return "\n\n".join(out)


def pod_to_text(text: str) -> str:
    """The prose paragraphs of a POD file: headings' words kept, commands and verbatim code dropped."""
    out = []
    for block in _paragraphs(text):
        first = block[0]
        if first[:1].isspace():
            continue  # verbatim paragraph (code)
        if first.startswith("="):
            if first.startswith(("=head", "=item")):
                words = first.split(None, 1)[1:]
                if words:
                    out.append(_POD_CODE.sub(lambda m: m.group(1).split("|")[0], words[0]).strip())
            continue
        para = " ".join(ln.strip() for ln in block)
        for _ in range(3):  # nested codes: B<C<x>>
            para = _POD_CODE.sub(lambda m: m.group(1).split("|")[0], para)
        if len(para.split()) >= 4:
            out.append(para)
    return "\n\n".join(out)


_FONT = re.compile(r"\\f(?:\[[^\]]*\]|\(..|.)")  # \fB, \fI, \f(CW, \f[R]
_ESCAPE = re.compile(r"\\(?:\(..|\[[^\]]*\]|[&|^%:])")  # \(em, \[rs], zero-width escapes
_TEXT_MACROS = {"B", "I", "BR", "IR", "RB", "BI", "IB", "RI", "SH", "SS", "SM", "SB", "TP", "IP", "UR", "MT"}
_BREAK_MACROS = {"PP", "LP", "P", "TP", "IP", "SH", "SS", "HP", "RS", "RE", "sp", "br"}


def roff_to_text(text: str) -> str:
    """The prose of a man page: no-fill (code) regions, tables and requests dropped, font
    macros' words kept, one paragraph per .PP/.TP/.SH."""
    paras: list[str] = []
    current: list[str] = []
    nofill = False

    def flush() -> None:
        para = " ".join(" ".join(current).split())
        current.clear()
        if len(para.split()) >= 4:
            paras.append(para)

    for line in text.splitlines():
        if line.startswith((".", "'")):
            parts = line[1:].split(None, 1)
            name = parts[0] if parts else ""
            if name in ("nf", "EX", "TS", "EQ"):
                nofill = True
                flush()
            elif name in ("fi", "EE", "TE", "EN"):
                nofill = False
            elif name in _BREAK_MACROS:
                flush()
            if name in _TEXT_MACROS and len(parts) > 1 and not nofill:
                current.append(parts[1].replace('"', "").replace("\\-", "-"))
            continue
        if nofill:
            continue
        line = _FONT.sub("", line)
        line = _ESCAPE.sub(lambda m: {"\\(em": " - ", "\\(en": "-"}.get(m.group(0), ""), line)
        current.append(line.replace("\\-", "-").replace("\\e", "\\").replace("\\ ", " "))
    flush()
    return "\n\n".join(_FONT.sub("", p) for p in paras)


class _HTMLProse(html.parser.HTMLParser):
    """Text of an HTML page's paragraphs, list items, definitions and headings; <pre> and tables dropped."""

    BLOCKS = {"p", "li", "dd", "dt", "h1", "h2", "h3", "h4", "h5", "title"}
    SKIP = {"pre", "script", "style", "table", "head"}

    def __init__(self) -> None:
        super().__init__()
        self.skip = 0
        self.paras: list[str] = []
        self.current: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in self.SKIP:
            self.skip += 1
        if tag in self.BLOCKS:
            self.flush()

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIP:
            self.skip = max(0, self.skip - 1)
        if tag in self.BLOCKS:
            self.flush()

    def handle_data(self, data: str) -> None:
        if not self.skip:
            self.current.append(data)

    def flush(self) -> None:
        para = " ".join("".join(self.current).split())
        self.current = []
        if len(para.split()) >= 4:
            self.paras.append(para)


def html_to_text(text: str) -> str:
    parser = _HTMLProse()
    parser.feed(text)
    parser.close()
    parser.flush()
    return "\n\n".join(parser.paras)


def kjv_books(root: Path, data: Path) -> Iterator[tuple[str, str]]:
    """(book, text) of the King James Bible, read by the bible-kjv program from its data file."""
    program = root / "bible-kjv" / "usr" / "bin" / "bible"
    done = subprocess.run(
        [str(program), "-p", str(data.parent), "Gen1:1-Rev22:21"], capture_output=True, text=True, check=True
    )
    book, verses = None, []
    for line in done.stdout.splitlines():
        head = re.fullmatch(r"(\S.*?) \d+", line.strip()) if line and not line[0].isspace() else None
        if head:
            if head.group(1) != book and verses:
                yield book, " ".join(verses)
                verses = []
            book = head.group(1)
            continue
        verse = re.sub(r"^\s*\d+\s+", "", line).strip()
        if verse:
            verses.append(verse)
    if verses:
        yield book, " ".join(verses)


def fetch(package: str, dest: Path) -> Path:
    """Download one Debian package (no install) and unpack it under dest/package."""
    target = dest / package
    if target.is_dir():
        return target
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise UserError("apt-get and dpkg-deb are needed to fetch the corpus packages (a Debian/Ubuntu machine)")
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        done = subprocess.run(["apt-get", "download", package], cwd=tmp, capture_output=True, text=True)
        debs = list(Path(tmp).glob("*.deb"))
        if done.returncode or not debs:
            raise UserError(
                f"apt-get download {package} failed (run apt-get update first?): "
                f"{(done.stderr or done.stdout).strip().splitlines()[-1:]}"
            )
        unpacked = Path(tmp) / "x"
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(unpacked)], check=True)
        unpacked.rename(target)
    return target


def documents(root: Path) -> Iterator[dict[str, str]]:
    """(package, path, text) of every source file, in a fixed order."""
    for package, (under, pattern) in PACKAGES.items():
        base = root / package / under
        files = sorted(base.rglob(pattern))
        if not files:
            raise UserError(f"{package} has no {pattern} under {under}: not the expected package version")
        if package == "bible-kjv-text":
            for book, text in kjv_books(root, files[0]):
                yield {"source": f"{package}:{book}", "text": text}
            continue
        for path in files:
            raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
            raw_text = raw.decode("utf-8", errors="replace")
            if package.startswith("manpages"):
                text = roff_to_text(raw_text)
                if text.startswith(".so") or len(text.split()) < 20:
                    continue
                yield {"source": f"{package}:{path.relative_to(base)}", "text": text}
                continue
            text = (
                pod_to_text(raw_text)
                if path.suffix == ".pod"
                else html_to_text(raw_text)
                if path.suffix == ".html"
                else rst_to_text(raw_text)
            )
            if len(text.split()) >= 20:
                yield {"source": f"{package}:{path.relative_to(base)}", "text": text}


def build_text(out: Path) -> Path:
    """corpus.jsonl.gz under out (fetching the packages into out/debs)."""
    corpus = out / "corpus.jsonl.gz"
    if corpus.exists():
        return corpus
    debs = out / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    for package in [*PACKAGES, *HELPERS]:
        fetch(package, debs)
    partial = corpus.with_suffix(".partial")
    words = docs = 0
    with gzip.open(partial, "wt", encoding="utf-8") as f:
        for doc in documents(debs):
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
            words += len(doc["text"].split())
            docs += 1
    partial.rename(corpus)
    print(f"{corpus}: {docs} documents, {words:,} words", flush=True)
    return corpus


def build_dataset(
    out: Path, corpus: Path, vocab_size: int, max_seq_len: int, val_fraction: float, tokenizer: Path | None = None
) -> Path:
    """tokenizer/ (unless `tokenizer` is given) and mds/ under out, through the `mosaicbert-ds
    tokenizer` and `convert` commands."""
    mds = out / "mds"
    cli = [sys.executable, "-m", "mosaicbert_ds.cli"]
    if tokenizer is None:
        tokenizer = out / "tokenizer"
    elif not (tokenizer / "tokenizer.json").is_file():
        raise UserError(f"--tokenizer {tokenizer} holds no tokenizer.json")
    if not (tokenizer / "tokenizer.json").exists():
        subprocess.run(
            [*cli, "tokenizer", str(corpus), "--out", str(tokenizer), "--vocab-size", str(vocab_size)], check=True
        )
    if not (mds / "dataset.json").exists() and not (mds / "index.json").exists():
        subprocess.run(
            [
                *cli,
                "convert",
                str(corpus),
                "--tokenizer",
                str(tokenizer),
                "--out",
                str(mds),
                "--max-seq-len",
                str(max_seq_len),
                "--split-long",
                "--val-fraction",
                str(val_fraction),
            ],
            check=True,
        )
    return mds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--out", required=True, help="folder for debs/, corpus.jsonl.gz, tokenizer/, mds/")
    parser.add_argument("--vocab-size", type=int, default=30522)
    parser.add_argument("--max-seq-len", type=int, default=128)
    parser.add_argument("--val-fraction", type=float, default=0.02)
    parser.add_argument("--text-only", action="store_true", help="stop after corpus.jsonl.gz")
    parser.add_argument(
        "--tokenizer",
        type=Path,
        help="use this tokenizer instead of training one (e.g. an earlier build's OUT/mds/tokenizer: "
        "WordPiece training is not reproducible bit for bit, a loss-curve reference needs the same ids)",
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    try:
        corpus = build_text(out)
        if not args.text_only:
            print(build_dataset(out, corpus, args.vocab_size, args.max_seq_len, args.val_fraction, args.tokenizer))
    except UserError as err:
        print(f"prose_corpus: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
