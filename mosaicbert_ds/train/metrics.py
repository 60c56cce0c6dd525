"""One metrics dict per log interval, sent to TensorBoard, a JSON-lines file and the console.

Keys are namespaced ("loss/train", "throughput/tokens_per_sec", "memory/peak_gib", ...) so the
three sinks show the same numbers under the same names. Only rank 0 writes. A NaN or inf is
logged as what it is: TensorBoard gets the value itself; metrics.jsonl (strict JSON) gets `null`
and the key is listed under "nonfinite" in the same row. A None value (not measured) is left out.
"""

from __future__ import annotations

import json
import math
from pathlib import Path


class MetricsLogger:
    def __init__(self, out_dir: str | Path, enabled: bool, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.writer = None
        self.jsonl = None
        if not enabled:
            return
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(out / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(out / "tensorboard"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        values = {k: float(v) for k, v in metrics.items() if v is not None}
        nonfinite = [k for k, v in values.items() if not math.isfinite(v)]
        row = {"step": step, **{k: (v if math.isfinite(v) else None) for k, v in values.items()}}
        if nonfinite:
            row["nonfinite"] = nonfinite
        self.jsonl.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()


def console_line(metrics: dict[str, float]) -> str:
    """The essentials in a short line for the progress bar."""
    parts = []
    for key, fmt in (
        ("loss/train", "loss {:.3f}"),
        ("accuracy/train", "acc {:.3f}"),
        ("throughput/tokens_per_sec", "{:,.0f} tok/s"),
        ("throughput/mfu", "MFU {:.1%}"),
        ("optim/lr", "lr {:.2e}"),
        ("loss/eval", "eval {:.3f}"),
    ):
        if metrics.get(key) is not None:
            parts.append(fmt.format(metrics[key]))
    return " | ".join(parts)
