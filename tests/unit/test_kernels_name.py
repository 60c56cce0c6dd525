"""The repository's kernels/ folder never shadows Hugging Face's `kernels` from the repository root."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(code: str, extra_path: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *extra_path])}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_an_installed_kernels_distribution_wins_over_the_folder(tmp_path):
    fake = tmp_path / "site"
    (fake / "kernels").mkdir(parents=True)
    (fake / "kernels" / "__init__.py").write_text("WHO = 'the kernels distribution'\n")
    (fake / "kernels-0.9.dist-info").mkdir()
    (fake / "kernels-0.9.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: kernels\nVersion: 0.9\n")
    res = _run(
        "import kernels, mosaicbert_ds.kernels as ours; "
        "print(kernels.WHO); print(ours.flash_attn_varlen_func.__name__)",
        [str(fake)],
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.splitlines()[0] == "the kernels distribution"


def test_without_one_kernels_is_empty_and_transformers_imports(tmp_path):
    """transformers 5 imports `kernels` when it finds one without metadata: it must see an empty
    namespace-like module (no __file__), not the Triton kernels."""
    res = _run(
        "import transformers\n"
        "from transformers import PreTrainedModel, BertForMaskedLM\n"
        "import kernels\n"
        "print(getattr(kernels, '__file__', None), hasattr(kernels, 'flash_attn_varlen_func'))\n"
        "print(getattr(transformers.utils, 'is_kernels_available', lambda: False)())",  # 5.x has it
        [],
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ["None", "False", "False"]


def test_a_source_checkout_finds_kernels_and_benchmarks_under_the_package_names():
    """As on a machine that runs the tree without installing it (PYTHONPATH=<repo>): `python -S`
    skips the .pth files, so the editable install's finder is absent and only
    mosaicbert_ds/source_checkout.py maps the folders to mosaicbert_ds.kernels and .benchmarks."""
    site = next(p for p in sys.path if p.endswith("site-packages"))
    code = (
        "import mosaicbert_ds.benchmarks.bench as bench, mosaicbert_ds.kernels as k\n"
        "print(bench.__file__); print(k.__file__)"
    )
    res = subprocess.run(
        [sys.executable, "-S", "-c", code],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), site])},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == [str(ROOT / "benchmarks" / "bench.py"), str(ROOT / "kernels" / "__init__.py")]
