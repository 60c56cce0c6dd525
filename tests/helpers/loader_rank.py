"""One data-parallel rank of a loader test, run as its own process (RANK/WORLD_SIZE from the env).

    python loader_rank.py '{"path": ..., "batch_size": 4, "seed": 3, "ncn": 4, "steps": 3,
                            "out": "rank0.json", "state_in": null}'

Takes `steps` micro batches and writes the original token ids of each sample of each batch, and
the loader's state_dict after them, to `out`. With "micro_tokens" each item the loader yields is
one step (a list of micro batches): its samples are written as one batch, and the number of micro
batches of each step under "micro_counts".
"""

from __future__ import annotations

import json
import sys

from mosaicbert_ds.data import build_mlm_dataloader, sample_tokens


def main() -> None:
    cfg = json.loads(sys.argv[1])
    loader = build_mlm_dataloader(
        cfg["path"],
        split="train",
        batch_size=cfg["batch_size"],
        mlm_probability=0.3,
        seed=cfg["seed"],
        num_canonical_nodes=cfg["ncn"],
        remote_cache=cfg.get("remote_cache"),
        micro_tokens=cfg.get("micro_tokens"),
    )
    if cfg.get("state_in"):
        with open(cfg["state_in"]) as f:
            loader.load_state_dict(json.load(f))
    batches, counts = [], []
    for item in loader:
        micro = item if isinstance(item, list) else [item]
        batches.append([s.tolist() for batch in micro for s in sample_tokens(batch)])
        counts.append(len(micro))
        if len(batches) == cfg["steps"]:
            break
    with open(cfg["out"], "w") as f:
        json.dump({"batches": batches, "micro_counts": counts, "state": loader.state_dict()}, f)


if __name__ == "__main__":
    main()
