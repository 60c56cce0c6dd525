"""DeepSpeed configs: the builder, the checks of load_ds_config, and every shipped file.

The shipped files are checked by DeepSpeed's own parser at their world size; `precision_path`
(the table in docs/precision.md) is checked against a real DeepSpeed engine on CPU (in a
subprocess, so the process group it starts does not leak into other tests).
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mosaicbert_ds.errors import UserError
from mosaicbert_ds.train.ds_config import (
    BATCH_KEYS,
    KNOWN_KEYS,
    DsConfigError,
    build_ds_config,
    load_ds_config,
    parse_with_deepspeed,
    precision_path,
)

ROOT = Path(__file__).resolve().parents[2]
DS_CONFIGS = ROOT / "ds_configs"


def _generator():
    spec = importlib.util.spec_from_file_location("ds_configs_generate", DS_CONFIGS / "generate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module


def paper_config(**overrides) -> dict:
    args = dict(global_batch=4096, micro_batch=128, world_size=8, lr=5e-4, fused=True)
    return build_ds_config(**{**args, **overrides})


# ---------------------------------------------------------------------------------------------
# build_ds_config


def test_paper_recipe():
    cfg = paper_config()
    assert [cfg[k] for k in BATCH_KEYS] == [4096, 128, 4]
    params = cfg["optimizer"]["params"]
    assert cfg["optimizer"]["type"] == "AdamW" and params["torch_adam"] is True and params["fused"] is True
    assert params["betas"] == [0.9, 0.98] and params["eps"] == 1e-6 and params["lr"] == 5e-4
    # Composer's decoupled 1e-5 per step at the peak == torch's lr * wd with wd = 1e-5 / 5e-4
    assert params["weight_decay"] == 0.02
    assert cfg["zero_optimization"]["stage"] == 1 and cfg["bf16"]["enabled"] is True
    assert cfg["data_types"]["grad_accum_dtype"] == "fp32" and cfg["gradient_clipping"] == 1.0
    assert "scheduler" not in cfg
    assert precision_path(cfg) == "BF16_Optimizer"


def test_decay_per_step_at_peak_is_the_papers_for_any_lr():
    for lr in (5e-4, 1e-3, 2e-3):
        wd = paper_config(lr=lr)["optimizer"]["params"]["weight_decay"]
        assert lr * wd == pytest.approx(1e-5, rel=1e-9)


def test_cpu_variant_has_no_fused_kernel_and_fp32():
    cfg = build_ds_config(global_batch=8, micro_batch=2, world_size=2, lr=1e-3, bf16=False, fused=False)
    assert "fused" not in cfg["optimizer"]["params"] and cfg["bf16"]["enabled"] is False
    assert precision_path(cfg) == "DeepSpeedZeroOptimizer"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(global_batch=4096, micro_batch=128, world_size=3), "not divisible"),
        (dict(global_batch=4096, micro_batch=0, world_size=8), "positive integer"),
        (dict(optimizer="sgd"), "optimizer must be one of"),
        (dict(optimizer="lamb", zero_stage=1), "ZeRO stage 0"),
        (dict(zero_stage=3), "zero_stage must be 1 or 2"),
        (dict(lr=0.0), "lr must be positive"),
    ],
)
def test_build_refuses(kwargs, message):
    with pytest.raises(DsConfigError, match=message) as err:
        paper_config(**kwargs)
    assert isinstance(err.value, ValueError) and isinstance(err.value, UserError)


def test_lamb_runs_at_stage0_with_fp32_weights_and_bf16_autocast():
    cfg = paper_config(optimizer="lamb", lr=6e-3)
    assert cfg["optimizer"]["type"] == "Lamb" and cfg["zero_optimization"]["stage"] == 0
    assert cfg["bf16"]["enabled"] is False and cfg["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert precision_path(cfg) == "none"
    assert load_ds_config(cfg, 8)["gradient_accumulation_steps"] == 4


# ---------------------------------------------------------------------------------------------
# Shipped files


def test_shipped_files_match_the_generator(capsys):
    assert _generator().main(["--check"]) == 0, capsys.readouterr().err


def test_every_shipped_file_is_accepted_at_its_world_size():
    plans = _generator().plans()
    files = sorted(DS_CONFIGS.glob("*.json"))
    assert {p.filename for p in plans} == {f.name for f in files}
    assert len(files) >= 14
    for plan in plans:
        path = DS_CONFIGS / plan.filename
        gpus = int(re.search(r"_(\d+)gpu", path.name).group(1))  # from the name, not from the plan
        raw = json.loads(path.read_text())
        # the arithmetic holds exactly as written (nothing left for DeepSpeed to fill in)
        assert (
            raw["train_batch_size"] == raw["train_micro_batch_size_per_gpu"] * raw["gradient_accumulation_steps"] * gpus
        )
        assert load_ds_config(path, gpus) == raw  # our checks and DeepSpeed's parser at this world size
        assert parse_with_deepspeed(raw, gpus).train_batch_size == raw["train_batch_size"]
        with pytest.raises(UserError, match=f"this file is for {gpus} ranks"):
            load_ds_config(path, gpus * 2)


def test_shipped_rule():
    by_name = {p.filename: p for p in _generator().plans()}
    base8 = json.loads((DS_CONFIGS / "mosaicbert-base_8gpu.json").read_text())
    assert [base8[k] for k in BATCH_KEYS] == [4096, 256, 2]  # the paper's node, micro 256 (measured, README)
    assert json.loads((DS_CONFIGS / "mosaicbert-base_64gpu.json").read_text())["train_batch_size"] == 32768
    assert json.loads((DS_CONFIGS / "mosaicbert-base_200gpu.json").read_text())["train_batch_size"] == 102400
    for plan in by_name.values():
        assert plan.steps * plan.global_batch == 286_720_000
        assert plan.optimizer == "adamw" or plan.global_batch >= 32768


# ---------------------------------------------------------------------------------------------
# load_ds_config: every bad input gives one clear line


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "ds.json"
    path.write_text(text)
    return path


def _without(cfg: dict, *keys: str) -> dict:
    return {k: v for k, v in cfg.items() if k not in keys}


BAD_CONFIGS = {
    "typo": (
        lambda c: {**_without(c, "train_batch_size"), "train_batch_szie": 4096},
        r"unknown top-level key 'train_batch_szie' \(did you mean 'train_batch_size'\?\)",
    ),
    "elasticity": (lambda c: {**c, "elasticity": {"enabled": True}}, r"'elasticity' section was removed"),
    "scheduler": (lambda c: {**c, "scheduler": {"type": "WarmupLR"}}, r"remove the 'scheduler' section"),
    "batch mismatch": (
        lambda c: {**c, "gradient_accumulation_steps": 3},
        r"train_batch_size 4096 != train_micro_batch_size_per_gpu 128 x gradient_accumulation_steps 3 "
        r"x world size 8 \(= 3072\)",
    ),
    "not divisible": (
        lambda c: {**_without(c, "gradient_accumulation_steps"), "train_batch_size": 4000},
        r"4000 is not divisible by train_micro_batch_size_per_gpu 128 x world size 8",
    ),
    "no batch": (
        lambda c: _without(c, "train_batch_size", "train_micro_batch_size_per_gpu"),
        r"set train_batch_size or train_micro_batch_size_per_gpu",
    ),
    "bad batch type": (lambda c: {**c, "train_batch_size": "4096"}, r"train_batch_size must be a positive integer"),
    "deepspeed rejects": (
        lambda c: {**c, "zero_optimization": {"stagee": 1}},
        r"DeepSpeed rejects it: .*DeepSpeedZeroConfig.*stagee",
    ),
    "optimizer param": (
        lambda c: {
            **c,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True, "max_grad_norm": 1.0}},
        },
        r"optimizer AdamW does not take max_grad_norm",
    ),
    "accum dtype": (lambda c: {**c, "data_types": {"grad_accum_dtype": "fp33"}}, r"grad_accum_dtype 'fp33'"),
    "stage0 bf16 fp32 accum": (
        lambda c: {**c, "zero_optimization": {"stage": 0}},
        r"bf16 weights with fp32 gradient accumulation need ZeRO stage 1 or 2",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_load_refuses(tmp_path, case):
    mutate, message = BAD_CONFIGS[case]
    path = _write(tmp_path, json.dumps(mutate(paper_config())))
    with pytest.raises(UserError, match=message) as err:
        load_ds_config(path, 8)
    text = str(err.value)
    assert "\n" not in text and text.startswith(str(path)), text


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"train_batch_size": 8,', r"invalid JSON at line 1 column"),
        ("[1, 2]", r"a DeepSpeed config is a JSON object, got list"),
        ('{"train_batch_size": 8, "train_batch_size": 16}', r"duplicate key 'train_batch_size'"),
    ],
)
def test_load_refuses_bad_json(tmp_path, text, message):
    with pytest.raises(UserError, match=message):
        load_ds_config(_write(tmp_path, text), 1)


def test_load_refuses_unreadable(tmp_path):
    with pytest.raises(UserError, match=r"missing\.json: cannot read DeepSpeed config: No such file"):
        load_ds_config(tmp_path / "missing.json", 1)


def test_load_fills_in_the_missing_batch_key_as_deepspeed_would():
    cfg = paper_config()
    assert load_ds_config(_without(cfg, "gradient_accumulation_steps"), 8)["gradient_accumulation_steps"] == 4
    assert load_ds_config(_without(cfg, "train_micro_batch_size_per_gpu"), 8)["train_micro_batch_size_per_gpu"] == 128
    assert load_ds_config(_without(cfg, "train_batch_size"), 16)["train_batch_size"] == 8192
    filled = load_ds_config(_without(cfg, "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"), 8)
    assert [filled[k] for k in BATCH_KEYS] == [4096, 512, 1]  # DeepSpeed's own choice: no accumulation


# ---------------------------------------------------------------------------------------------
# Our use of DeepSpeed's parser stays faithful to DeepSpeed


def test_known_keys_cover_what_deepspeed_reads():
    """Record the top-level keys DeepSpeedConfig reads; a DeepSpeed upgrade that adds one fails here."""
    from deepspeed.runtime.config import _REMOVED_TOP_LEVEL_CONFIG_KEYS, DeepSpeedConfig

    seen: set[str] = set()

    class Keys(list):
        def __contains__(self, key):
            seen.add(key)
            return list.__contains__(self, key)

    class Recording(dict):
        def get(self, key, *default):
            seen.add(key)
            return super().get(key, *default)

        def __contains__(self, key):
            seen.add(key)
            return super().__contains__(key)

        def __getitem__(self, key):
            seen.add(key)
            return super().__getitem__(key)

        def keys(self):
            return Keys(super().keys())

        def __copy__(self):
            return Recording(self)

    DeepSpeedConfig(Recording(paper_config(world_size=1, global_batch=512)))
    assert len(seen) > 30
    missing = seen - set(_REMOVED_TOP_LEVEL_CONFIG_KEYS) - KNOWN_KEYS
    assert not missing, f"DeepSpeed reads keys load_ds_config would call unknown: {sorted(missing)}"


def test_parse_at_world_size_is_deepspeeds_parser():
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg = paper_config(world_size=1, global_batch=512)
    ours, theirs = vars(parse_with_deepspeed(cfg, 1)), vars(DeepSpeedConfig(dict(cfg)))
    assert ours.keys() == theirs.keys()
    plain = (int, float, str, bool, type(None), list, tuple, dict)
    same = [k for k in theirs if isinstance(theirs[k], plain) or hasattr(theirs[k], "model_dump")]
    assert len(same) > 30
    for key in same:
        assert ours[key] == theirs[key], key
    assert parse_with_deepspeed(paper_config(), 8).world_size == 8


ENGINE_SCRIPT = textwrap.dedent("""
    import json, sys, torch, deepspeed
    from mosaicbert_ds.train.distributed import init_distributed
    from mosaicbert_ds.train.ds_config import build_ds_config, precision_path

    init_distributed()
    cases = {
        "zero1 fp32": dict(zero_stage=1, bf16=False),
        "zero1 bf16": dict(zero_stage=1, bf16=True),
        "zero2 bf16": dict(zero_stage=2, bf16=True),
        "zero2 fp32": dict(zero_stage=2, bf16=False),
    }
    out = {}
    for name, kw in cases.items():
        cfg = build_ds_config(global_batch=4, micro_batch=2, world_size=1, lr=1e-3, fused=True, **kw)
        out[name] = cfg
    # The LAMB layout (ZeRO-0, fp32 weights, bf16 autocast) with AdamW in place of FusedLamb (CUDA only).
    lamb = build_ds_config(global_batch=4, micro_batch=2, world_size=1, lr=1e-3, optimizer="lamb")
    lamb["optimizer"] = out["zero1 fp32"]["optimizer"]
    out["lamb layout"] = lamb
    result = {}
    for name, cfg in out.items():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1))
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
        dtype = next(engine.module.parameters()).dtype
        for _ in range(2):  # two micro batches, one optimizer step
            loss = engine(torch.randn(2, 8, dtype=dtype)).float().pow(2).mean()
            engine.backward(loss)
            engine.step()
        wrapper = type(engine.optimizer).__name__
        basic = engine.basic_optimizer
        result[name] = dict(engine=wrapper if engine.optimizer is not basic else "none",
                            expected=precision_path(cfg), basic=type(basic).__name__,
                            fused=basic.defaults.get("fused"), weight_decay=basic.defaults["weight_decay"],
                            param_dtype=str(dtype), steps=engine.global_steps,
                            throughput_timer=engine.tput_timer.config.enabled)
    sys.stdout.write("RESULT " + json.dumps(result) + "\\n")
""")


def test_precision_table_matches_the_engine():
    proc = subprocess.run(
        [sys.executable, "-c", ENGINE_SCRIPT],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env=_single_process_env(),
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(lines[0][len("RESULT ") :])
    for name, row in result.items():
        assert row["engine"] == row["expected"], (name, row)
        assert row["basic"] == "AdamW" and row["steps"] == 1, (name, row)
        assert row["weight_decay"] == pytest.approx(1e-5 / 1e-3), (name, row)  # converted, then passed through
        assert row["fused"] is True, (name, row)  # "fused" reaches torch.optim.AdamW
        assert row["throughput_timer"] is False, (name, row)  # no device sync per micro batch
    assert result["zero1 bf16"]["engine"] == "BF16_Optimizer"
    assert result["zero1 bf16"]["param_dtype"] == "torch.bfloat16"
    assert result["lamb layout"]["engine"] == "none" and result["lamb layout"]["param_dtype"] == "torch.float32"


def _single_process_env() -> dict[str, str]:
    import os

    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("OMPI_", "PMI", "SLURM_"))}
    env["PYTHONPATH"] = str(ROOT)
    return env


def test_load_switches_the_syncing_throughput_timer_off_unless_the_file_sets_it():
    cfg = paper_config()
    assert load_ds_config(_without(cfg, "timers"), 8)["timers"] == {"throughput": {"enabled": False}}
    mine = {**cfg, "timers": {"throughput": {"enabled": True, "synchronized": False}}}
    assert load_ds_config(mine, 8)["timers"] == mine["timers"]
