"""Batched gradient accumulation for DeepSpeed's BF16_Optimizer.

After every micro batch, DeepSpeed 0.19's BF16_Optimizer adds each bf16 parameter gradient to its
fp32 accumulation buffer in a Python loop: per parameter a cast to an fp32 copy, a view and an add
(about 200 parameters for MosaicBERT-Base, well over a thousand host-side ops per micro batch).
A Base step at micro batch 256 on an H200 is already bound by the host's launch rate, so that
loop is most of what separates the DeepSpeed trainer from the bare step.

`batch_bf16_grad_accumulation(engine)` swaps that loop, on this engine's optimizer only, for one
`torch._foreach_add_` per parameter group (fp32 += bf16 promotes inside the kernel: no fp32 copy
of the gradient), with the same bookkeeping (`_hp_grad`, `fp32_groups_has_gradients`, clearing).
The sums are the same numbers DeepSpeed computes (tests/test_ds_patches.py compares them
bitwise). It applies only to the case it was written against (BF16_Optimizer, no
immediate_grad_update, no expert folding) and leaves anything else to DeepSpeed.
"""

from __future__ import annotations

import types
from typing import Any

import torch

_NEEDED = ("bf16_groups", "fp32_groups_gradients", "fp32_groups_has_gradients", "immediate_grad_update")


def batch_bf16_grad_accumulation(engine: Any) -> bool:
    """Install the batched accumulation on `engine.optimizer`; returns whether it applied."""
    opt = engine.optimizer
    if type(opt).__name__ != "BF16_Optimizer" or not all(hasattr(opt, a) for a in _NEEDED):
        return False
    if opt.immediate_grad_update or getattr(opt, "autoep_folding_tp_group", None) is not None:
        return False
    opt.update_hp_grads = types.MethodType(_update_hp_grads, opt)
    return True


@torch.no_grad()
def _update_hp_grads(self: Any, clear_lp_grads: bool = False) -> None:
    for i, group in enumerate(self.bf16_groups):
        hp_grads, lp_grads, shaped = [], [], []
        for j, lp in enumerate(group):
            if lp.grad is None:
                continue
            hp = self.fp32_groups_gradients[i][j]
            assert hp is not None, f"high precision param has no gradient: group {i}, param {j}"
            hp_grads.append(hp)
            lp_grads.append(lp.grad.detach())
            shaped.append(lp_grads[-1].reshape(hp.shape))
            lp._hp_grad = hp
            self.fp32_groups_has_gradients[i][j] = True
        if hp_grads:
            torch._foreach_add_(hp_grads, shaped)
            if clear_lp_grads:
                torch._foreach_zero_(lp_grads)
