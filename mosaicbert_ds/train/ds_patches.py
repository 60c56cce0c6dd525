"""Batched host loops for DeepSpeed's BF16_Optimizer.

A MosaicBERT-Base step at micro batch 256 on an H200 is about as long for the host to issue as for
the GPU to run, so host work that DeepSpeed adds shows up directly as lost tokens/s. DeepSpeed
0.19's BF16_Optimizer has two per-parameter Python loops on that path (about 200 parameters for
Base):
- after every micro batch it adds each bf16 gradient to its fp32 accumulation buffer: per
  parameter a cast to an fp32 copy, a view and an add;
- at every optimizer step it computes the gradient norm with one norm kernel per parameter, and
  clips with one multiply per parameter, after a second host sync on `clip_coef < 1`.

`batch_bf16_optimizer(engine)` swaps both, on this engine's optimizer only:
- accumulation: one `torch._foreach_add_` per parameter group (fp32 += bf16 promotes inside the
  kernel: no fp32 copy of the gradient), with the same bookkeeping (`_hp_grad`,
  `fp32_groups_has_gradients`, clearing);
- step: the per-tensor norms from one `torch._foreach_norm`, combined as DeepSpeed combines them,
  and the clip as one `torch._foreach_mul_` by min(1, max_norm / (norm + 1e-6)) computed on the
  device (DeepSpeed multiplies only when that is below 1; multiplying by exactly 1.0 changes
  nothing). DeepSpeed skips the step when the norm is not finite, which needs a host sync: the
  GPU then idles while the host does the rest of the step and prepares the next micro batch. With
  torch's fused AdamW (what our configs select on CUDA) the skip happens on the device instead,
  through the kernel's found_inf flag: no sync. The one difference: DeepSpeed does not see such a
  skip, so its skipped-step counter stays and the learning-rate schedule advances (a non-finite
  norm in bf16 training means the run has diverged anyway). Without a fused optimizer, DeepSpeed's
  host-side check stays.
The results are DeepSpeed's numbers (tests/integration/test_ds_patches.py compares the master weights
bitwise, with and without clipping). Each patch applies only to the case it was written against
(BF16_Optimizer; no immediate_grad_update or expert folding for the accumulation; 2-norm, no
model parallelism, MoE or Muon for the step) and leaves anything else to DeepSpeed.
"""

from __future__ import annotations

import types
from typing import Any

import torch

_NEEDED = ("bf16_groups", "fp32_groups_gradients", "fp32_groups_has_gradients", "immediate_grad_update",
           "clip_grad", "norm_type", "fp32_groups_flat_partition", "fp32_groups_gradient_flat_partition")


def is_bf16_optimizer(opt: Any) -> bool:
    """Whether DeepSpeed built its BF16_Optimizer (the path these patches, the one-rank all-reduce
    skip and the CUDA-graph step are written against)."""
    return type(opt).__name__ == "BF16_Optimizer"


def batch_bf16_optimizer(engine: Any) -> dict[str, bool]:
    """Install the batched loops on `engine.optimizer`; returns which of them applied."""
    opt = engine.optimizer
    applied = {"accumulation": False, "step": False}
    if not is_bf16_optimizer(opt) or not all(hasattr(opt, a) for a in _NEEDED):
        return applied
    if not opt.immediate_grad_update and getattr(opt, "autoep_folding_tp_group", None) is None:
        opt.update_hp_grads = types.MethodType(_update_hp_grads, opt)
        applied["accumulation"] = True
    if (float(opt.norm_type) == 2.0 and getattr(opt, "mpu", None) is None and not opt.has_moe_layers
            and not getattr(opt, "_uses_muon", False)):
        opt.step = types.MethodType(_step, opt)
        applied["step"] = True
    return applied


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


def _global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """DeepSpeed's get_global_norm_of_tensors for the 2-norm: the norm of the per-tensor fp32 norms,
    -1 where it is not finite; here from one multi-tensor kernel."""
    norms = torch._foreach_norm([t.detach().float() for t in tensors], 2)
    total = torch.stack(norms).pow(2.0).sum().pow(0.5)
    return total.masked_fill_(~torch.isfinite(total), -1.0)


def _skips_on_device(optimizer: Any) -> bool:
    """torch's fused Adam/AdamW, which can skip a step on the device (its found_inf argument)."""
    return isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)) and bool(optimizer.defaults.get("fused"))


@torch.no_grad()
def _step(self: Any, closure: Any = None) -> None:
    # DeepSpeed 0.19.8's BF16_Optimizer.step for its dense, single-model-parallel case
    if closure is not None:
        raise NotImplementedError(f"{type(self).__name__} does not support closure.")
    self.overflow = False
    grads, _ = self.get_grads_for_norm()
    norm = _global_norm(grads)
    if _skips_on_device(self.optimizer):
        # no host sync: where found_inf is 1 the fused kernel leaves weights and moments alone and
        # undoes its step count; the update of the bf16 weights then copies unchanged values
        self.optimizer.found_inf = (norm < 0).float()
        self._global_grad_norm = norm.masked_fill(norm < 0, float("inf"))
    else:
        self._global_grad_norm = norm
        if bool(norm < 0):  # a host sync, as in DeepSpeed: a non-finite norm skips the step
            self.overflow = True
            self._global_grad_norm = float("inf")
            self.clear_hp_grads()
            self.clear_lp_grads()
            return
    if self.clip_grad > 0.0:
        coef = (self.clip_grad / (norm + 1e-6)).clamp_(max=1.0)
        torch._foreach_mul_(self.get_grads_for_norm(for_clipping=True), coef)
    for param, grad in zip(self.fp32_groups_flat_partition, self.fp32_groups_gradient_flat_partition):
        param.grad = grad.to(param.dtype) if grad.dtype != param.dtype else grad
    self.optimizer.step()
    self.optimizer.__dict__.pop("found_inf", None)
    if self.grad_acc_dtype is not torch.float32:
        for param in self.fp32_groups_flat_partition:
            param.grad = None
    self._lazy_init_hp_params_optimizer_state()
    self.update_lp_params()
    self.clear_hp_grads()
