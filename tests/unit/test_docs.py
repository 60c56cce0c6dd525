"""The README and docs stay true to the code: every `mosaicbert-ds` command they show parses as
the CLI parses it (pretrain run files and overrides included), and every relative link and
#anchor resolves."""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINKED = [*DOCS, ROOT / "ds_configs" / "README.md", ROOT / "launch" / "README.md", ROOT / "tests" / "README.md"]


def shown_commands(text: str, inline: bool) -> list[str]:
    """`mosaicbert-ds ...` lines of the bash blocks (continuations joined, comments cut), and with
    `inline` the inline code spans too (the docs' prose names commands without their arguments)."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            words = shlex.split(line) if line else []
            if "mosaicbert_ds.cli" in words:
                line = shlex.join(["mosaicbert-ds", *words[words.index("mosaicbert_ds.cli") + 1 :]])
            if line.startswith("mosaicbert-ds "):
                lines.append(line)
    return lines + (re.findall(r"`(mosaicbert-ds [^`]+)`", text) if inline else [])


def parse(line: str) -> None:
    from mosaicbert_ds.cli import COMMANDS

    words = shlex.split(line)
    name, rest = words[1], words[2:]
    assert name in COMMANDS, f"no subcommand {name!r}"
    parser = argparse.ArgumentParser(prog=f"mosaicbert-ds {name}", exit_on_error=False)
    importlib.import_module(COMMANDS[name][0]).add_arguments(parser)
    if any(a.nargs == argparse.REMAINDER for a in parser._actions):
        args = parser.parse_args(rest)
    else:
        args = parser.parse_intermixed_args(rest)
    if name == "pretrain":
        from mosaicbert_ds.train.run_config import load_run_config

        load_run_config(args.run, args.overrides)


def test_every_command_the_readme_and_docs_show_parses():
    commands = [(doc.name, line) for doc in DOCS for line in shown_commands(doc.read_text(), doc.name == "README.md")]
    assert len([c for c in commands if c[0] == "README.md"]) >= 10
    failed = []
    for doc, line in commands:
        try:
            parse(line)
        except (Exception, SystemExit) as err:  # argparse exits on a bad choice
            failed.append(f"{doc}: {line} -> {type(err).__name__}: {err}")
    assert not failed, "\n".join(failed)


def _anchor(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("doc", LINKED, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_anchors_resolve(doc: Path):
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists():
            broken.append(f"missing {target}")
        elif anchor and dest.suffix == ".md":
            if anchor not in {_anchor(h) for h in re.findall(r"^#+ (.*)$", dest.read_text(), re.M)}:
                broken.append(f"no heading for {target}")
    assert not broken, f"{doc.relative_to(ROOT)}: " + "; ".join(broken)
