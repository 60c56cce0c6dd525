"""Parallel writers, parts and merging: one dataset whatever produced it; damage is noticed."""

from __future__ import annotations

import json

import pytest

from mosaicbert_ds.data import INDEX_NAME, build_mlm_dataloader, read_dataset_info, sample_tokens
from mosaicbert_ds.data.convert import ConvertConfig, convert_corpus, merge_parts
from mosaicbert_ds.data.info import check_dataset
from mosaicbert_ds.data.sources import SourceConfig
from mosaicbert_ds.errors import UserError
from tests.helpers.data import jargon_docs, run_cli, tokenizer_dir, write_jsonl

OPTIONS = dict(max_seq_len=32, val_fraction=0.1, block_docs=40, shard_size="4kb", progress=False)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tok = tokenizer_dir(tmp_path_factory)
    src = write_jsonl(tmp_path_factory.mktemp("corpus") / "docs.jsonl", jargon_docs(330))
    return src, tok


def convert(corpus, out, **options):
    src, tok = corpus
    return convert_corpus(
        ConvertConfig(source=SourceConfig(paths=[str(src)]), out=str(out), tokenizer=str(tok), **{**OPTIONS, **options})
    )


def stream(path, split, shuffle) -> list[list[int]]:
    loader = build_mlm_dataloader(
        str(path), split=split, batch_size=8, mlm_probability=0.3, seed=5, shuffle=shuffle, drop_last=False
    )
    return [s.tolist() for batch in loader for s in sample_tokens(batch)]


def shard_bytes(path) -> dict[str, bytes]:
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*.mds.zstd"))}


@pytest.fixture(scope="module")
def single(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "ds"
    convert(corpus, out, workers=1)
    return out


def test_writers_and_parts_give_the_same_dataset(corpus, single, tmp_path):
    multi = tmp_path / "multi"
    convert(corpus, multi, workers=2)
    parts = [tmp_path / f"part{i}" for i in range(4)]
    for i, part in enumerate(parts):
        convert(corpus, part, workers=1 + i % 2, part=(i, 4))
    merged = tmp_path / "merged"
    merge_parts(str(merged), [str(p) for p in reversed(parts)])  # any order on the command line

    ref = read_dataset_info(str(single))
    assert ref["unigram_entropy"] > 0 and ref["unigram_val_loss"] > ref["unigram_entropy"]
    assert ref["blocks"] == 9 and len(list((single / "train").iterdir())) > 9  # 9 blocks, several shards
    for other in (multi, merged):
        info = read_dataset_info(str(other))
        for key in (
            "documents",
            "samples",
            "tokens_kept",
            "splits",
            "shards",
            "fingerprint",
            "unigram_entropy",
            "unigram_val_loss",
        ):
            assert info[key] == ref[key], key
        assert shard_bytes(other) == shard_bytes(single)
        for split, shuffle in (("train", True), ("val", False)):
            assert stream(other, split, shuffle) == stream(single, split, shuffle)
    # the parts really split the work: each wrote only its own blocks
    written = [json.loads((p / INDEX_NAME).read_text())["part"]["written_blocks"] for p in parts]
    assert written == [[0, 4, 8], [1, 5], [2, 6], [3, 7]]
    check_dataset(str(merged), hashes=True)


def test_merge_refuses_gaps_unfinished_parts_and_parts_used_as_datasets(corpus, tmp_path, capsys):
    parts = [tmp_path / f"p{i}" for i in range(3)]
    for i, part in enumerate(parts):
        convert(corpus, part, workers=1, part=(i, 3))
    out = tmp_path / "out"
    code, _, err = run_cli(["convert", "--merge", out, parts[0], parts[2]], capsys)
    assert code == 2 and err.strip().splitlines() == [
        "mosaicbert-ds convert: error: cannot merge: part(s) 1/3 missing (got 2 of 3)"
    ]
    code, _, err = run_cli(["convert", "--merge", out, parts[0], parts[0], parts[1]], capsys)
    assert code == 2 and "given twice" in err and len(err.strip().splitlines()) == 1
    (parts[1] / INDEX_NAME).unlink()  # as if that part's conversion had stopped
    code, _, err = run_cli(["convert", "--merge", out, *parts], capsys)
    assert code == 2 and "is unfinished" in err and str(parts[1]) in err
    assert not out.exists() and not (tmp_path / "out.partial").exists()
    with pytest.raises(UserError, match="part 0/3 of a conversion"):
        read_dataset_info(str(parts[0]))
    code, _, err = run_cli(["convert", "x.jsonl", "--tokenizer", "t", "--out", out, "--part", "4/4"], capsys)
    assert code == 2 and "need 0 <= I < N" in err


def test_merge_through_the_cli_matches_and_reruns_are_no_ops(corpus, single, tmp_path, capsys):
    src, tok = corpus
    parts = []
    for i in range(2):
        parts.append(tmp_path / f"p{i}")
        code, _, err = run_cli(
            [
                "convert",
                src,
                "--tokenizer",
                tok,
                "--out",
                parts[-1],
                "--part",
                f"{i}/2",
                "--max-seq-len",
                32,
                "--val-fraction",
                0.1,
                "--block-docs",
                40,
                "--shard-size",
                "4kb",
                "--workers",
                1,
                "--quiet",
            ],
            capsys,
        )
        assert code == 0, err
    out = tmp_path / "merged"
    assert run_cli(["convert", "--merge", out, *parts], capsys)[0] == 0
    assert shard_bytes(out) == shard_bytes(single)
    code, stdout, _ = run_cli(["convert", "--merge", out, *parts], capsys)
    assert code == 0 and "nothing to do" in stdout


def test_rerun_over_a_damaged_dataset_rebuilds_it(corpus, tmp_path, capsys):
    out = tmp_path / "ds"
    convert(corpus, out, workers=1)
    good = shard_bytes(out)
    victim = sorted((out / "train").rglob("*.mds.zstd"))[3]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte
    victim.write_bytes(bytes(data))
    with pytest.raises(UserError, match="hash differs"):
        check_dataset(str(out), hashes=True)
    capsys.readouterr()
    convert(corpus, out, workers=1)
    assert "damaged" in capsys.readouterr().out and shard_bytes(out) == good
    victim.write_bytes(victim.read_bytes()[:100])  # truncated: size check, no hashing needed
    with pytest.raises(UserError, match="bytes, the index says"):
        check_dataset(str(out))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_shard_during_training_stops_with_one_line(single, tmp_path, workers, damage):
    import shutil

    data = tmp_path / "ds"
    shutil.copytree(single, data)
    stream(data, "train", True)  # read once: streaming keeps decompressed copies beside the shards
    victim = sorted((data / "train").rglob("*.mds.zstd"))[5]
    assert victim.with_suffix("").is_file()
    raw = bytearray(victim.read_bytes())
    if damage == "flip":
        raw[len(raw) // 2] ^= 0xFF
    else:
        raw = raw[: len(raw) // 2]
    victim.write_bytes(bytes(raw))
    loader = build_mlm_dataloader(
        str(data), split="train", batch_size=4, mlm_probability=0.3, seed=1, num_workers=workers
    )
    with pytest.raises(UserError) as caught:
        for _ in range(3):  # a few epochs: the shard is reached whatever the order
            for _ in loader:
                pass
    message = str(caught.value)
    assert len(message.splitlines()) == 1
    assert "shard " in message and str(victim.relative_to(data / "train")) in message, message


def test_convert_benchmark_writes_rates_estimates_and_provenance(corpus, tmp_path):
    from benchmarks.convert import main as bench_main

    _, tok = corpus
    assert (
        bench_main(
            [
                "--docs",
                "60",
                "--doc-chars",
                "300",
                "--block-docs",
                "16",
                "--writers",
                "1",
                "2",
                "--tokenizer",
                str(tok),
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    result = json.loads((tmp_path / "convert.json").read_text())
    assert [r["writers"] for r in result["rows"]] == [1, 2]
    assert all(r["documents"] == 60 and r["tokens_per_s"] > 0 for r in result["rows"])
    assert len(result["git_commit"]) == 40 and isinstance(result["git_dirty"], bool)
    assert "benchmarks.convert" in result["command"] and result["versions"]["mosaicml-streaming"]
    one_node, eight = result["c4_en"]["estimates"]
    assert (one_node["cores"], eight["cores"]) == (64, 512)
    assert one_node["hours_from_tokens"] == pytest.approx(8 * eight["hours_from_tokens"], rel=0.02)
    assert "| 2 |" in (tmp_path / "convert.md").read_text()
