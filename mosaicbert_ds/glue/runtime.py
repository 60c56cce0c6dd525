"""Where finetuning runs: one process (CPU or one GPU) or plain torch DDP over several.

Several processes are recognised by WORLD_SIZE > 1 in the environment, as torchrun and the
deepspeed launcher set it (with RANK and LOCAL_RANK); the process group then starts as for
pretraining (mosaicbert_ds.train.distributed.init_distributed) and each process drives its GPU
(NCCL) or, without CUDA, a CPU process (gloo). DeepSpeed's engine is not used for finetuning: a
137M-parameter model fits one GPU, and DDP is all the paper's recipe needs.

Precision: bf16 autocast on CUDA with fp32 master weights; plain fp32 on CPU.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..errors import UserError
from ..train.distributed import init_distributed


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    owns_process_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order (just [obj] in one process)."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_process_group = False


def setup_runtime(device: str = "auto") -> Runtime:
    """The device for this process, joining the process group when launched with several."""
    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu or cuda, got {device!r}")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Runtime(torch.device("cuda") if use_cuda else torch.device("cpu"))
    owns = not dist.is_initialized()
    if owns:  # the trainer's process-group setup (it also picks this rank's GPU)
        init_distributed(use_cuda=use_cuda)
    dev = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    return Runtime(dev, dist.get_rank(), dist.get_world_size(), owns)
