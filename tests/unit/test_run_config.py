"""Run files and their key=value overrides: bundled recipes, types, mistakes as one line, CUDA-graph checks."""

import json

import pytest

from mosaicbert_ds import MosaicBertConfig
from mosaicbert_ds.errors import UserError
from mosaicbert_ds.train.run_config import RECIPES_DIR, load_run_config


@pytest.mark.parametrize("recipe", sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
def test_every_bundled_recipe_loads(recipe):
    cfg = load_run_config(recipe, ["data.path=/data/x"])
    MosaicBertConfig.from_name(cfg.model.preset, **cfg.model.overrides)
    assert cfg.batch.global_batch % cfg.batch.micro_batch == 0


def test_paper_recipe_values():
    cfg = load_run_config("mosaicbert-base", ["data.path=/d"])
    assert (cfg.batch.global_batch, cfg.batch.micro_batch) == (4096, 256)
    assert cfg.optimizer.lr == 5e-4 and cfg.optimizer.betas == (0.9, 0.98) and cfg.optimizer.eps == 1e-6
    assert cfg.optimizer.weight_decay == 1e-5 and cfg.data.mlm_probability == 0.3
    assert cfg.schedule.warmup_fraction == 0.06 and cfg.schedule.final_lr_ratio == 0.02
    assert cfg.duration.samples == 70_000 * 4096
    assert (cfg.eval.interval, cfg.checkpoint.interval) == (2000, 3500)
    bert = load_run_config("bert-base", ["data.path=/d"])
    assert bert.data.mlm_probability == 0.15 and bert.data.padded and bert.model.preset == "bert-base"


def test_overrides_are_typed_and_replace_alternatives():
    cfg = load_run_config(
        "tiny-cpu",
        [
            "data.path=/d",
            "optimizer.lr=3e-4",
            "optimizer.betas=[0.8, 0.9]",
            "log.tensorboard=false",
            "model.overrides.num_hidden_layers=3",
            "duration.samples=1000",
        ],
    )
    assert cfg.optimizer.lr == 3e-4 and cfg.optimizer.betas == (0.8, 0.9)
    assert cfg.log.tensorboard is False and cfg.model.overrides == {"num_hidden_layers": 3}
    assert cfg.duration.samples == 1000 and cfg.duration.steps is None


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optimizer.lrr=1"], "unknown key(s) optimizer.lrr"),
        (["optimizer.lr=fast"], "optimizer.lr must be a number"),
        (["batch.micro_batch=5"], "not a multiple"),
        (["data.mlm_probability=1.5"], "mlm_probability"),
        (["precision=fp8"], "precision"),
        (["eval.interval=-1"], "eval.interval"),
        (["seed"], "key=value"),
    ],
)
def test_bad_run_configs(overrides, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_run_config("tiny-cpu", ["data.path=/d", *overrides])


def test_missing_data_path_and_bad_file(tmp_path):
    with pytest.raises(UserError, match="data.path is not set"):
        load_run_config("tiny-cpu")
    bad = tmp_path / "run.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(UserError, match="cannot read run file"):
        load_run_config(str(bad))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.padded=true"], "packed batches"),
        (["compile=true"], "exclusive"),
        (["precision=fp32"], "bf16 path"),
    ],
)
def test_cuda_graphs_refuses_what_it_cannot_run(overrides, message):
    with pytest.raises(UserError, match=message):
        load_run_config("tiny-cpu", ["data.path=/d", "cuda_graphs=true", "precision=auto", *overrides])
    load_run_config("tiny-cpu", ["data.path=/d", "cuda_graphs=true", "precision=auto"])  # accepted


def test_cuda_graphs_are_checked_against_the_deepspeed_config_that_runs(tmp_path):
    from mosaicbert_ds.train.ds_config import build_ds_config
    from mosaicbert_ds.train.engine import resolve_ds_config, use_graphs

    zero2 = load_run_config(
        "tiny-cpu", ["data.path=/d", "cuda_graphs=true", "precision=bf16", "optimizer.zero_stage=2"]
    )
    with pytest.raises(UserError, match="cuda_graphs: true cannot run: .*BF16_Optimizer.*DeepSpeedZeroOptimizer"):
        use_graphs(zero2, resolve_ds_config(zero2, 1)[0])
    # the run file says ZeRO-1, the JSON that runs says ZeRO-2: the JSON decides, and is refused
    path = tmp_path / "zero2.json"
    path.write_text(json.dumps(build_ds_config(global_batch=8, micro_batch=8, world_size=1, lr=1e-3, zero_stage=2)))
    cfg = load_run_config(
        "tiny-cpu", ["data.path=/d", "cuda_graphs=true", "precision=bf16", f"deepspeed_config={path}"]
    )
    with pytest.raises(UserError, match="BF16_Optimizer"):
        use_graphs(cfg, resolve_ds_config(cfg, 1)[0])
    auto = load_run_config("tiny-cpu", ["data.path=/d", "precision=bf16", f"deepspeed_config={path}"])
    assert use_graphs(auto, resolve_ds_config(auto, 1)[0]) is False  # auto: off where they do not apply


RUN_FILE = """\
model:
  preset: tiny
data:
  path: /d
optimizer:
  lr: 1e-3
  eps: 1E-8
  betas: [0.9, 9.8e-1]
duration:
  steps: 3
"""


def test_yaml_numbers_without_a_dot_are_numbers(tmp_path):
    """YAML 1.1 reads 1e-3 as the string '1e-3'; float fields take it as the number it means."""
    path = tmp_path / "run.yaml"
    path.write_text(RUN_FILE)
    cfg = load_run_config(str(path))
    assert cfg.optimizer.lr == 1e-3 and cfg.optimizer.eps == 1e-8 and cfg.optimizer.betas == (0.9, 0.98)
    assert isinstance(cfg.optimizer.lr, float)
    for bad, message in (("lr: 1e-3", "lr: fast"), ("lr: 1e-3", "lr: nan")):
        path.write_text(RUN_FILE.replace(bad, message))
        with pytest.raises(UserError, match="optimizer.lr must be a number"):
            load_run_config(str(path))
    path.write_text(RUN_FILE.replace("steps: 3", "steps: '3'"))
    with pytest.raises(UserError, match="duration.steps must be an integer"):  # only float fields read text
        load_run_config(str(path))


@pytest.mark.parametrize(
    "text, message",
    [
        (RUN_FILE + "optimizer:\n  lr: 2e-3\n", "line 11: duplicate key 'optimizer' (first on line 5)"),
        (
            RUN_FILE.replace("  eps: 1E-8\n", "  eps: 1E-8\n  lr: 5e-4\n"),
            "line 8: duplicate key 'lr' (first on line 6)",
        ),
        (RUN_FILE.replace("preset: tiny", "preset: tiny\n  preset: base"), "duplicate key 'preset'"),
    ],
)
def test_duplicate_sections_and_keys_are_errors(tmp_path, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as err:
        load_run_config(str(path))
    assert message in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)
    assert path.read_text() == text


def test_duplicate_keys_in_a_json_run_file(tmp_path):
    path = tmp_path / "run.json"
    path.write_text('{"data": {"path": "/d"}, "duration": {"steps": 3}, "seed": 1, "seed": 2}')
    with pytest.raises(UserError, match="duplicate key 'seed'"):
        load_run_config(str(path))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.preset=huge"], "model.preset: unknown model preset 'huge'"),
        (["model.overrides.hiden_size=64"], "model.overrides: unknown model config key(s) ['hiden_size']"),
        (
            ["model.overrides.num_attention_heads=3"],
            "model.overrides: num_attention_heads (3) must divide hidden_size (64)",
        ),
        (["model.overrides.hidden_size=big"], "model.overrides: "),
        (["model.overrides.mlp_type=swiglu"], "mlp_type must be 'glu' or 'gelu'"),
    ],
)
def test_model_config_mistakes_are_one_line(overrides, message, capsys):
    with pytest.raises(UserError) as err:
        load_run_config("tiny-cpu", ["data.path=/d", *overrides])
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)
    from tests.helpers.data import run_cli

    code, out, errtext = run_cli(["pretrain", "tiny-cpu", "data.path=/d", *overrides, "--dry-run"], capsys)
    assert code == 2 and errtext.strip().splitlines() == [f"mosaicbert-ds pretrain: error: {err.value}"]
