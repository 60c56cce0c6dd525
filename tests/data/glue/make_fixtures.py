"""Write the tiny GLUE fixtures beside this file: tsv/<TASK>/ in GLUE's layouts, jsonl/<task>/.

Each task's label follows a keyword rule a two-layer model can learn in a few dozen steps
(e.g. SST-2: "good"/"great" -> 1, "bad"/"awful" -> 0; STS-B: the score is the number of
"match" words). Re-run to regenerate: python tests/data/glue/make_fixtures.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
FILLER = (
    "the a cat dog man woman child bird sat ran saw ate took gave on in under near big small red blue "
    "old new house tree car road park river city book song"
).split()
N_TRAIN, N_DEV = 48, 24


def words(rng: random.Random, n: int) -> list[str]:
    return [rng.choice(FILLER) for _ in range(n)]


def sentence(rng: random.Random, keyword: str | None = None, copies: int = 1) -> str:
    w = words(rng, rng.randint(3, 7))
    for _ in range(copies if keyword else 0):
        w.insert(rng.randint(0, len(w)), keyword)
    return " ".join(w)


def write_tsv(path: Path, header: list[str] | None, rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = (["\t".join(header)] if header else []) + ["\t".join(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def make(rng: random.Random) -> None:
    tsv = HERE / "tsv"
    for split, n in (("train", N_TRAIN), ("dev", N_DEV)):
        # SST-2: sentence, label
        rows = []
        for i in range(n):
            y = i % 2
            rows.append([sentence(rng, rng.choice(["good", "great"] if y else ["bad", "awful"])), str(y)])
        write_tsv(tsv / "SST-2" / f"{split}.tsv", ["sentence", "label"], rows)
        # CoLA: no header; source, label, original marker, sentence
        rows = []
        for i in range(n):
            y = (i + 1) % 2
            rows.append(["gj04", str(y), "" if y else "*", sentence(rng, "fine" if y else "wrong")])
        write_tsv(tsv / "CoLA" / f"{split}.tsv", None, rows)
        # MRPC: Quality, #1 ID, #2 ID, #1 String, #2 String
        rows = []
        for i in range(n):
            y = i % 2
            rows.append([str(y), str(1000 + i), str(2000 + i), sentence(rng), sentence(rng, "same" if y else "other")])
        write_tsv(tsv / "MRPC" / f"{split}.tsv", ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"], rows)
        # QQP: id, qid1, qid2, question1, question2, is_duplicate
        rows = []
        for i in range(n):
            y = (i // 2) % 2
            rows.append(
                [str(i), str(2 * i), str(2 * i + 1), sentence(rng), sentence(rng, "same" if y else "other"), str(y)]
            )
        write_tsv(tsv / "QQP" / f"{split}.tsv", ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"], rows)
        # QNLI and RTE: string labels entailment / not_entailment
        for task, header in (
            ("QNLI", ["index", "question", "sentence", "label"]),
            ("RTE", ["index", "sentence1", "sentence2", "label"]),
        ):
            rows = []
            for i in range(n):
                y = i % 2
                rows.append(
                    [
                        str(i),
                        sentence(rng),
                        sentence(rng, "no" if y else "yes"),
                        "not_entailment" if y else "entailment",
                    ]
                )
            write_tsv(tsv / task / f"{split}.tsv", header, rows)
        # STS-B: ... sentence1, sentence2, score (the number of "match" words)
        rows = []
        for i in range(n):
            score = i % 6
            rows.append(
                [
                    str(i),
                    "main-captions",
                    "MSRvid",
                    "2012test",
                    f"{i:04d}",
                    "none",
                    "none",
                    sentence(rng),
                    sentence(rng, "match", score) if score else sentence(rng),
                    f"{score:.3f}",
                ]
            )
        write_tsv(
            tsv / "STS-B" / f"{split}.tsv",
            [
                "index",
                "genre",
                "filename",
                "year",
                "old_index",
                "source1",
                "source2",
                "sentence1",
                "sentence2",
                "score",
            ],
            rows,
        )
    # MNLI: train.tsv (label1, gold_label), dev_matched / dev_mismatched (label1..label5, gold_label)
    names = ["entailment", "neutral", "contradiction"]
    keyword = {"entailment": "alpha", "neutral": "beta", "contradiction": "gamma"}
    for split, n, n_labels in (("train", 2 * N_TRAIN, 1), ("dev_matched", N_DEV, 5), ("dev_mismatched", N_DEV, 5)):
        header = (
            [
                "index",
                "promptID",
                "pairID",
                "genre",
                "sentence1_binary_parse",
                "sentence2_binary_parse",
                "sentence1_parse",
                "sentence2_parse",
                "sentence1",
                "sentence2",
            ]
            + [f"label{j + 1}" for j in range(n_labels)]
            + ["gold_label"]
        )
        rows = []
        for i in range(n):
            gold = names[i % 3]
            a, b = sentence(rng), sentence(rng, keyword[gold])
            rows.append(
                [str(i), str(i), f"{i}e", "fiction", f"( {a} )", f"( {b} )", f"(ROOT {a})", f"(ROOT {b})", a, b]
                + [gold] * n_labels
                + [gold]
            )
        write_tsv(tsv / "MNLI" / f"{split}.tsv", header, rows)

    # JSONL with the HF dataset's field names: RTE (integer labels) and STS-B (float labels).
    jsonl = HERE / "jsonl"
    for split, n in (("train", N_TRAIN), ("validation", N_DEV)):
        write_jsonl(
            jsonl / "rte" / f"{split}.jsonl",
            [
                {
                    "sentence1": sentence(rng),
                    "sentence2": sentence(rng, "no" if i % 2 else "yes"),
                    "label": i % 2,
                    "idx": i,
                }
                for i in range(n)
            ],
        )
        write_jsonl(
            jsonl / "stsb" / f"{split}.jsonl",
            [
                {
                    "sentence1": sentence(rng),
                    "sentence2": sentence(rng, "match", i % 6) if i % 6 else sentence(rng),
                    "label": float(i % 6),
                    "idx": i,
                }
                for i in range(n)
            ],
        )


if __name__ == "__main__":
    make(random.Random(7))
