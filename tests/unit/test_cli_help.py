"""Every subcommand's --help shows at least one example command line; finetune-glue's names the
eight GLUE tasks."""

import pytest

from mosaicbert_ds import cli

GLUE_TASKS = ("mnli", "qnli", "qqp", "sst2", "cola", "rte", "mrpc", "stsb")


def help_text(name: str, capsys) -> str:
    with pytest.raises(SystemExit) as done:
        cli.main([name, "--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_every_subcommand_help_shows_an_example(name, capsys):
    text = help_text(name, capsys)
    assert text.startswith(f"usage: mosaicbert-ds {name}")
    examples = [
        line
        for line in text.splitlines()
        if line.startswith("    ") and (f"mosaicbert-ds {name}" in line or f"mosaicbert_ds.cli {name}" in line)
    ]
    assert examples, f"`mosaicbert-ds {name} --help` shows no example:\n{text}"


def test_finetune_glue_help_names_the_eight_tasks(capsys):
    text = help_text("finetune-glue", capsys)
    for task in GLUE_TASKS:
        assert task in text, task
