"""Conversion: text -> MDS shards, checked token for token against the tokenizer itself."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from mosaicbert_ds.data import INDEX_NAME, load_tokenizer, prepare_default_corpus, read_dataset_info
from tests.helpers.data import convert_docs, jargon_docs, read_split, run_cli, tokenizer_dir, write_jsonl

MAX_LEN = 32


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return tokenizer_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def hf_tok(tok_dir):
    return AutoTokenizer.from_pretrained(str(tok_dir))


def test_truncate_round_trip_is_token_exact(tmp_path, hf_tok):
    docs = jargon_docs(300) + ["a", "short one", "ünïcödé café – “quotes” and 日本語"]
    out = convert_docs(tmp_path, docs, max_seq_len=MAX_LEN, val_docs=20, workers=2, shard_size="8kb")
    expected = [hf_tok(d, truncation=True, max_length=MAX_LEN)["input_ids"] for d in docs]
    got_val, got_train = read_split(out, "val"), read_split(out, "train")
    assert [s.tolist() for s in got_val] == expected[:20]
    assert [s.tolist() for s in got_train] == expected[20:]
    assert got_train[0].dtype == np.uint16

    info = read_dataset_info(str(out))
    full = [len(hf_tok(d, add_special_tokens=False)["input_ids"]) for d in docs]
    assert info["tokens_kept"] == sum(min(n, MAX_LEN - 2) for n in full)
    assert info["tokens_dropped"] == sum(max(n - MAX_LEN + 2, 0) for n in full)
    assert info["tokens_dropped"] > 0
    assert info["documents"] == info["samples"] == len(docs)
    assert info["splits"]["val"]["samples"] == 20 and info["splits"]["train"]["samples"] == len(docs) - 20
    assert info["truncation"] == "truncate" and info["max_seq_len"] == MAX_LEN
    assert info["token_dtype"] == "uint16" and info["vocab_size"] == len(hf_tok) == 2048
    t = info["tokenizer"]
    assert (t["cls_token_id"], t["sep_token_id"], t["pad_token_id"], t["mask_token_id"]) == (2, 3, 0, 4)
    assert len(list((out / "train").rglob("shard.*.mds.zstd"))) > 1
    # the tokenizer travels with the data and loads offline
    assert load_tokenizer(str(out))(docs[0])["input_ids"] == hf_tok(docs[0])["input_ids"]


def test_split_long_keeps_every_token(tmp_path, hf_tok):
    docs = jargon_docs(120)
    out = convert_docs(tmp_path, docs, max_seq_len=MAX_LEN, split_long=True, val_fraction=0.0)
    samples = read_split(out, "train")
    expected, it = [], iter(samples)
    for doc in docs:
        ids = hf_tok(doc, add_special_tokens=False)["input_ids"]
        windows = [ids[i : i + MAX_LEN - 2] for i in range(0, len(ids), MAX_LEN - 2)]
        expected += [[hf_tok.cls_token_id, *w, hf_tok.sep_token_id] for w in windows]
        # the windows of one document, unwrapped, are the document's full tokenization
        got = [next(it).tolist() for _ in windows]
        assert [t for s in got for t in s[1:-1]] == ids
    assert [s.tolist() for s in samples] == expected
    assert all(len(s) <= MAX_LEN for s in samples)
    info = read_dataset_info(str(out))
    assert info["tokens_dropped"] == 0 and info["truncation"] == "split"
    assert info["tokens_kept"] == sum(len(s) - 2 for s in samples)
    assert info["samples"] > info["documents"] == len(docs)
    assert list(info["splits"]) == ["train"] and not (out / "val").exists()


def test_val_fraction_is_deterministic_and_near_the_fraction(tmp_path):
    docs = jargon_docs(1000)
    a = convert_docs(tmp_path, docs, name="a", val_fraction=0.1)
    b = convert_docs(tmp_path, docs, name="b", val_fraction=0.1, workers=2, chunk_docs=37)
    ia, ib = read_dataset_info(str(a)), read_dataset_info(str(b))
    assert ia["splits"] == ib["splits"]
    assert 60 <= ia["splits"]["val"]["documents"] <= 140
    assert [s.tolist() for s in read_split(a, "val")] == [s.tolist() for s in read_split(b, "val")]


def test_text_paragraphs_gzip_parquet_and_hf_sources_agree(tmp_path, tok_dir, hf_tok, capsys):
    docs = jargon_docs(40)
    with gzip.open(tmp_path / "docs.txt.gz", "wt", encoding="utf-8") as f:
        f.write("\n\n".join(d.replace(". ", ".\n") for d in docs) + "\n")  # multi-line paragraphs
    pq.write_table(pa.table({"body": docs}), tmp_path / "docs.parquet")
    (tmp_path / "hf").mkdir()
    write_jsonl(tmp_path / "hf" / "train.jsonl", docs, field="body")
    common = ["--tokenizer", tok_dir, "--max-seq-len", MAX_LEN, "--val-fraction", 0, "--quiet", "--workers", 1]
    runs = {
        "text": [tmp_path / "docs.txt.gz", "--text-unit", "paragraph"],
        "parquet": [tmp_path / "docs.parquet", "--text-field", "body"],
        "hf": ["--hf-dataset", tmp_path / "hf", "--text-field", "body"],
    }
    expected = [hf_tok(d.replace(". ", ".\n"), truncation=True, max_length=MAX_LEN)["input_ids"] for d in docs]
    for name, args in runs.items():
        code, out, err = run_cli(["convert", *args, "--out", tmp_path / f"out_{name}", *common], capsys)
        assert code == 0, err
        assert f"converted {len(docs)} documents" in out
        assert [s.tolist() for s in read_split(tmp_path / f"out_{name}", "train")] == expected, name


def test_clean_drops_table_rows_and_collapses_whitespace():
    from mosaicbert_ds.data.sources import clean_text

    table = "Glyphs:\n┌─────┬─────┐\n│ α   │ alpha │\n└─────┴─────┘\n  spaced   out\ttext  "
    assert clean_text(table) == "Glyphs: spaced out text"


def test_rerun_same_dataset_is_a_no_op_and_different_needs_overwrite(tmp_path, tok_dir, capsys):
    src = write_jsonl(tmp_path / "a.jsonl", jargon_docs(50))
    args = [
        "convert",
        src,
        "--tokenizer",
        tok_dir,
        "--out",
        tmp_path / "out",
        "--quiet",
        "--workers",
        1,
        "--val-docs",
        5,
    ]
    assert run_cli(args, capsys)[0] == 0
    stamp = (tmp_path / "out" / INDEX_NAME).stat().st_mtime_ns
    code, out, _ = run_cli(args, capsys)
    assert code == 0 and "nothing to do" in out
    assert (tmp_path / "out" / INDEX_NAME).stat().st_mtime_ns == stamp

    code, _, err = run_cli([*args, "--max-seq-len", 16], capsys)
    assert code == 2 and "already holds a different dataset" in err and "--overwrite" in err
    code, _, err = run_cli([*args, "--max-seq-len", 16, "--overwrite"], capsys)
    assert code == 0, err
    assert read_dataset_info(str(tmp_path / "out"))["max_seq_len"] == 16
    assert not list(tmp_path.glob("out.*")), "no partial or old folders are left behind"


def test_bad_utf8_skip_counts_and_reports(tmp_path, tok_dir, capsys):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"good line one\nbad \xff\xfe line\ngood line two\n")
    code, out, err = run_cli(
        [
            "convert",
            path,
            "--tokenizer",
            tok_dir,
            "--out",
            tmp_path / "o",
            "--quiet",
            "--on-bad-utf8",
            "skip",
            "--val-fraction",
            0,
            "--workers",
            1,
        ],
        capsys,
    )
    assert code == 0, err
    assert "1 not UTF-8" in out
    info = read_dataset_info(str(tmp_path / "o"))
    assert info["skipped"]["bad_utf8"] == 1 and info["documents"] == 2


def test_default_corpus_is_quick_and_idempotent(tmp_path):
    import time

    start = time.perf_counter()
    path = prepare_default_corpus(tmp_path / "jargon", workers=2)
    elapsed = time.perf_counter() - start
    info = read_dataset_info(str(path))
    assert info["vocab_size"] == 8192 and info["max_seq_len"] == 128
    assert info["splits"]["train"]["samples"] > 4000 and info["splits"]["val"]["samples"] > 150
    assert info["recipe"]["name"].startswith("jargon")
    assert elapsed < 60
    stamp = (path / INDEX_NAME).stat().st_mtime_ns
    assert prepare_default_corpus(tmp_path / "jargon") == path
    assert (path / INDEX_NAME).stat().st_mtime_ns == stamp
    index = json.loads((path / INDEX_NAME).read_text())
    assert index["tokenizer"]["name_or_path"].startswith("WordPiece 8192")


def test_special_token_text_inside_a_document_stays_text(tmp_path, hf_tok):
    out = convert_docs(tmp_path, ["a page that says [SEP] and [MASK] and [CLS] literally"], val_fraction=0.0)
    (sample,) = read_split(out, "train")
    assert sample[0] == hf_tok.cls_token_id and sample[-1] == hf_tok.sep_token_id
    assert not set(sample[1:-1].tolist()) & set(hf_tok.all_special_ids)
    assert "[ sep ]" in hf_tok.decode(sample[1:-1].tolist())


def test_fetch_replaces_a_cached_copy_atomically(tmp_path):
    from mosaicbert_ds.data.info import _fetch

    (tmp_path / "remote.json").write_text("new")
    (tmp_path / "cache.json").write_text("stale")
    _fetch(str(tmp_path / "remote.json"), str(tmp_path / "cache.json"))
    assert (tmp_path / "cache.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.json", "remote.json"]


def test_row_packer_best_fit_is_deterministic_and_bounded():
    from mosaicbert_ds.data.packing import RowPacker

    def run(lengths, capacity=10, max_open=2):
        packer, rows = RowPacker(capacity, max_open), []
        for i, n in enumerate(lengths):
            rows += packer.add(np.full(n, i))
        return [[int(s[0]) for s in row] for row in rows + packer.flush()]

    # 6 opens a row; 3 fits it (room 4 -> 1, closed: too small for any sequence); 5 and 4 share one
    assert run([6, 3, 5, 4]) == [[0, 1], [2, 3]]
    # best fit: 3 goes to the row with the least room that takes it (the 7, not the 4)
    assert run([4, 7, 3]) == [[1, 2], [0]]
    # more open rows than max_open: the fullest (least room) is closed first
    assert run([5, 6, 7]) == [[2], [0], [1]]
    assert run([10, 1, 10]) == [[0], [2], [1]]  # a full row closes at once
    with pytest.raises(ValueError, match="does not fit a row of 10"):
        RowPacker(10).add(np.zeros(11))


def test_pack_keeps_every_sequence_and_reports_its_efficiency(tmp_path, tok_dir, hf_tok, capsys):
    docs = jargon_docs(200)
    src = write_jsonl(tmp_path / "d.jsonl", docs)
    common = ["convert", src, "--tokenizer", tok_dir, "--max-seq-len", 64, "--split-long", "--quiet", "--val-docs", 10]
    code, out, err = run_cli([*common, "--out", tmp_path / "plain", "--workers", 1], capsys)
    assert code == 0, err
    assert "--pack would put several sequences in a row" in out  # documents shorter than 64 tokens
    code, out, err = run_cli([*common, "--out", tmp_path / "packed", "--pack", "--workers", 2], capsys)
    assert code == 0, err
    info = read_dataset_info(str(tmp_path / "packed"))
    capacity = info["samples"] * 64
    efficiency = sum(c["tokens"] for c in info["splits"].values()) / capacity
    assert f"into {info['samples']} rows of 64 tokens: packing efficiency {100 * efficiency:.1f}%" in out
    assert efficiency > 0.9 and info["packed"] is True
    plain = read_dataset_info(str(tmp_path / "plain"))
    for split in ("train", "val"):
        rows = read_split(tmp_path / "packed", split)
        sequences = [tuple(s.tolist()) for r in rows for s in np.split(r, np.flatnonzero(r == hf_tok.cls_token_id)[1:])]
        assert all(len(r) <= 64 for r in rows) and len(rows) < len(sequences)
        # the same sequences as without packing, each once (rows regroup them, in another order)
        assert sorted(sequences) == sorted(tuple(s.tolist()) for s in read_split(tmp_path / "plain", split))
        assert info["splits"][split]["sequences"] == len(sequences) == plain["splits"][split]["samples"]
        assert info["splits"][split]["documents"] == plain["splits"][split]["documents"]
    assert info["tokens_kept"] == plain["tokens_kept"] and info["tokens_dropped"] == 0
    # packing happens within each block: one writer or two give the same bytes
    blocks = [*common, "--pack", "--block-docs", 50]
    assert run_cli([*blocks, "--out", tmp_path / "w1", "--workers", 1], capsys)[0] == 0
    assert run_cli([*blocks, "--out", tmp_path / "w2", "--workers", 2], capsys)[0] == 0
    shards = [
        {f.relative_to(d): f.read_bytes() for d in [tmp_path / w] for f in d.rglob("*.mds.zstd")} for w in ("w1", "w2")
    ]
    assert shards[0] == shards[1] and len(shards[0]) >= 4
    # the stored lengths are the sequences': what the loader turns into cu_seqlens
    from streaming import StreamingDataset

    from mosaicbert_ds.data.packing import decode_lengths

    ds = StreamingDataset(local=str(tmp_path / "packed"), split="train", batch_size=1)
    for i in range(ds.num_samples):
        ids = np.frombuffer(ds[i]["input_ids"], dtype="<u2")
        lengths = decode_lengths(ds[i]["doc_lengths"])
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        assert lengths.sum() == len(ids) and (ids[starts] == hf_tok.cls_token_id).all()
