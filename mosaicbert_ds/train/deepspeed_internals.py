"""Every place mosaicbert_ds reaches into DeepSpeed's private internals, checked against the
DeepSpeed versions it was tested with (TESTED: 0.19.x, as setup.cfg pins). Each function here calls
`check_version()` first, so an untested DeepSpeed fails with one line naming its version instead of
a patch silently not applying. What each function changes in DeepSpeed, when, and why:
docs/precision.md, "What the trainer changes in DeepSpeed".

The batched BF16_Optimizer loops. A MosaicBERT-Base step at micro batch 256 on an H200 is about as
long for the host to issue as for the GPU to run, so host work that DeepSpeed adds could show up as
lost tokens/s. DeepSpeed 0.19's BF16_Optimizer has two per-parameter Python loops on that path
(about 200 parameters for Base):
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

import copy
import types
from typing import Any

import torch

from ..errors import UserError

TESTED = ((0, 19),)
"""DeepSpeed (major, minor) releases every function here was tested with."""

_NEEDED = (
    "bf16_groups",
    "fp32_groups_gradients",
    "fp32_groups_has_gradients",
    "immediate_grad_update",
    "clip_grad",
    "norm_type",
    "fp32_groups_flat_partition",
    "fp32_groups_gradient_flat_partition",
    "backward_epilogue",
    "get_grads_for_norm",
    "update_lp_params",
    "clear_hp_grads",
    "clear_lp_grads",
    "has_moe_layers",
    "grad_acc_dtype",
    "_lazy_init_hp_params_optimizer_state",
)


def check_version(version: str | None = None) -> None:
    """Raise UserError (one line naming the version) unless DeepSpeed is a TESTED release."""
    if version is None:
        import deepspeed

        version = deepspeed.__version__
    try:
        major_minor = tuple(int(x) for x in version.split(".")[:2])
    except ValueError:
        major_minor = None
    if major_minor not in TESTED:
        tested = ", ".join(f"{a}.{b}.x" for a, b in TESTED)
        raise UserError(
            f"DeepSpeed {version} is untested: mosaicbert_ds patches DeepSpeed internals tested "
            f"with {tested} only (pip install 'deepspeed>=0.19,<0.20')"
        )


def is_bf16_optimizer(opt: Any) -> bool:
    """Whether DeepSpeed built its BF16_Optimizer (the path these patches, the one-rank all-reduce
    skip and the CUDA-graph step are written against)."""
    check_version()
    return type(opt).__name__ == "BF16_Optimizer"


def _require(opt: Any, names: tuple[str, ...]) -> None:
    missing = [n for n in names if not hasattr(opt, n)]
    if missing:
        import deepspeed

        raise UserError(
            f"DeepSpeed {deepspeed.__version__}'s BF16_Optimizer lacks {', '.join(missing)}, "
            "which mosaicbert_ds's patches need (tested with DeepSpeed 0.19.x)"
        )


def prepare_engine(engine: Any, batched_optimizer: bool = False) -> dict[str, bool]:
    """What build_engine changes on a fresh engine: the one-rank all-reduce skip (always) and, when
    asked, the batched BF16_Optimizer loops. Returns which changes applied."""
    applied = {"accumulation": False, "step": False, "allreduce_skip": False}
    if not is_bf16_optimizer(engine.optimizer):
        return applied
    _require(engine.optimizer, _NEEDED)
    if batched_optimizer:
        applied.update(batch_bf16_optimizer(engine))
    applied["allreduce_skip"] = skip_single_rank_allreduce(engine)
    return applied


def skip_single_rank_allreduce(engine: Any) -> bool:
    """On one rank with BF16_Optimizer, turn off the engine's gradient all-reduce (nothing to
    reduce; docs/precision.md says what it would do). Returns whether it did."""
    if engine.dp_world_size == 1 and is_bf16_optimizer(engine.optimizer):
        engine.enable_backward_allreduce = False
        return True
    return False


def check_graphable(engine: Any) -> str | None:
    """Why the CUDA-graph step cannot drive this engine, or None when it can."""
    opt = engine.optimizer
    if not is_bf16_optimizer(opt) or getattr(opt, "immediate_grad_update", True):
        return (
            "cuda_graphs needs DeepSpeed's BF16_Optimizer (bf16 with ZeRO stage 1, fp32 gradient "
            f"accumulation, no immediate_grad_update); this engine has {type(opt).__name__}"
        )
    _require(opt, ("backward_epilogue",))
    return None


def _hp_slots(opt: Any, params: list[torch.nn.Parameter]) -> list[tuple[int, int] | None]:
    """(group, index) of each parameter in BF16_Optimizer's groups (None for one it does not train)."""
    where = {id(lp): (i, j) for i, group in enumerate(opt.bf16_groups) for j, lp in enumerate(group)}
    return [where.get(id(p)) for p in params]


def fp32_gradient_buffers(engine: Any, params: list[torch.nn.Parameter]) -> list[torch.Tensor | None]:
    """BF16_Optimizer's fp32 gradient-accumulation buffer of each parameter (None for one it does not
    train). These are views into flat buffers that live as long as the optimizer and are zeroed in
    place after each step (clear_hp_grads), so a CUDA graph may add into them. Each parameter's
    `_hp_grad` is pointed at its buffer, as BF16_Optimizer.update_hp_grads does."""
    opt = engine.optimizer
    _require(opt, ("bf16_groups", "fp32_groups_gradients", "fp32_groups_has_gradients"))
    buffers: list[torch.Tensor | None] = []
    for p, slot in zip(params, _hp_slots(opt, params)):
        buffers.append(None if slot is None else opt.fp32_groups_gradients[slot[0]][slot[1]])
        if slot is not None:
            p._hp_grad = buffers[-1]
    engine._graph_hp_slots = _hp_slots(opt, params)
    return buffers


def graphed_backward_epilogue(engine: Any, used: tuple[bool, ...]) -> None:
    """What `engine.backward` does after autograd on the BF16_Optimizer path, for a graph replay that
    added its gradients into the fp32 buffers itself (fp32_gradient_buffers): BF16_Optimizer's record
    of which buffers hold gradients (update_hp_grads sets it per parameter), then the all-reduce (a
    no-op except at accumulation boundaries)."""
    has_gradients = engine.optimizer.fp32_groups_has_gradients
    for slot, has_grad in zip(engine._graph_hp_slots, used):
        if has_grad and slot is not None:
            has_gradients[slot[0]][slot[1]] = True
    if engine.enable_backward_allreduce:
        engine.allreduce_gradients()


def dtype_name(value: Any) -> str | None:
    """DeepSpeed's name for a ds_config dtype value ("fp32", "bf16", ...); None for None."""
    if value is None:
        return None
    from deepspeed.runtime.config import DtypeEnum

    try:
        return DtypeEnum(value).name
    except ValueError:
        raise ValueError(
            f'data_types.grad_accum_dtype {value!r} is not a dtype DeepSpeed knows (use "fp32" or "bf16")'
        ) from None


def parse_with_deepspeed(config: dict[str, Any], world_size: int) -> Any:
    """DeepSpeed's DeepSpeedConfig for `config` at `world_size` (raises what DeepSpeed raises).

    DeepSpeedConfig.__init__ asks torch.distributed for the world size and falls back to 1 when
    no group exists (an `mpu` is only consulted after that call succeeds), so there is no argument
    that sets it. This runs the constructor's steps with world_size set first; a test checks that
    at world size 1 the result equals a real DeepSpeedConfig, so a DeepSpeed change shows up.
    """
    check_version()
    from deepspeed.runtime import config as ds_config_module

    config = copy.deepcopy(config)
    parsed = object.__new__(ds_config_module.DeepSpeedConfig)
    parsed._param_dict = config
    ds_config_module._reject_removed_config_keys(config)
    parsed.global_rank = 0
    parsed.world_size = world_size
    parsed._initialize_params(copy.copy(config))
    parsed._configure_train_batch_size()
    parsed._do_sanity_check()
    return parsed


def batch_bf16_optimizer(engine: Any) -> dict[str, bool]:
    """Install the batched loops on `engine.optimizer`; returns which of them applied (each only in
    the case it was written against; a BF16_Optimizer without the attributes they use is an error)."""
    opt = engine.optimizer
    applied = {"accumulation": False, "step": False}
    if not is_bf16_optimizer(opt):
        return applied
    _require(opt, _NEEDED)
    if not opt.immediate_grad_update and getattr(opt, "autoep_folding_tp_group", None) is None:
        opt.update_hp_grads = types.MethodType(_update_hp_grads, opt)
        applied["accumulation"] = True
    if (
        float(opt.norm_type) == 2.0
        and getattr(opt, "mpu", None) is None
        and not opt.has_moe_layers
        and not getattr(opt, "_uses_muon", False)
    ):
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
