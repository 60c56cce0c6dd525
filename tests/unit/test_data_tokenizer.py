"""The WordPiece tokenizer trainer: BERT layout, rounding to 64, offline loading."""

from __future__ import annotations

from transformers import AutoTokenizer

from mosaicbert_ds.data import read_dataset_info
from tests.helpers.data import convert_docs, jargon_docs, run_cli, tokenizer_dir


def test_trained_tokenizer_is_an_uncased_bert_tokenizer(tmp_path_factory):
    folder = tokenizer_dir(tmp_path_factory)  # asked for 2000 -> 2048
    tok = AutoTokenizer.from_pretrained(str(folder))
    assert tok.is_fast and len(tok) == 2048
    assert [tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id] == [
        0,
        1,
        2,
        3,
        4,
    ]
    assert [tok.pad_token, tok.unk_token, tok.cls_token, tok.sep_token, tok.mask_token] == [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
    ]
    ids = tok("The Hacker's CAFÉ")["input_ids"]
    assert ids[0] == 2 and ids[-1] == 3
    assert ids == tok("the hacker's cafe")["input_ids"]  # lower-cased, accents stripped
    pair = tok("first", "second")
    assert pair["input_ids"].count(3) == 2 and set(pair["token_type_ids"]) == {0, 1}
    pieces = tok.tokenize("hackishness")
    assert pieces and all(p.startswith("##") for p in pieces[1:])


def test_small_corpus_is_padded_to_the_rounded_size(tmp_path, capsys):
    (tmp_path / "tiny.txt").write_text("the cat sat on the mat\nthe dog sat on the log\n" * 3)
    code, out, err = run_cli(
        ["tokenizer", tmp_path / "tiny.txt", "--vocab-size", 100, "--out", tmp_path / "tok"], capsys
    )
    assert code == 0, err
    assert "128-token" in out
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert len(tok) == 128 and "[unused0]" in tok.get_vocab()
    assert tok.convert_ids_to_tokens(tok("the cat")["input_ids"]) == ["[CLS]", "the", "cat", "[SEP]"]

    # the padding entries are never drawn as random MLM replacements
    out = convert_docs(tmp_path, ["the cat sat", "the dog sat"], tokenizer=tmp_path / "tok", val_fraction=0.0)
    info = read_dataset_info(str(out))
    unused = [i for t, i in tok.get_vocab().items() if t.startswith("[unused")]
    assert set(unused) <= set(info["tokenizer"]["non_replacement_ids"])
    assert info["token_dtype"] == "uint8"


def test_tokenizer_reads_gzip_paragraphs_with_cleaning(tmp_path, capsys):
    import gzip

    with gzip.open(tmp_path / "c.txt.gz", "wt", encoding="utf-8") as f:
        f.write("\n\n".join(jargon_docs(300)) + "\n\n┌──┐\n│x │\n└──┘\n")
    code, _, err = run_cli(
        [
            "tokenizer",
            tmp_path / "c.txt.gz",
            "--text-unit",
            "paragraph",
            "--clean",
            "--vocab-size",
            512,
            "--out",
            tmp_path / "tok",
        ],
        capsys,
    )
    assert code == 0, err
    vocab = AutoTokenizer.from_pretrained(str(tmp_path / "tok")).get_vocab()
    assert len(vocab) == 512 and not any("┌" in t or "│" in t for t in vocab)
