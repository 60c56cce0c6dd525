"""The top-level kernels/ and benchmarks/ folders under their installed names, in a checkout that
is not installed.

The repository keeps the Triton kernels and the benchmarks in folders beside the package;
installing maps them into it (setup.cfg's `package_dir`: mosaicbert_ds.kernels = kernels,
mosaicbert_ds.benchmarks = benchmarks). A checkout run without installing (PYTHONPATH=<repo>)
has no such mapping, so `map_source_folders`, which mosaicbert_ds/__init__.py calls first, adds
an import finder that gives those two names the folders. The kernels are then never imported as
a top-level `kernels`, a name that belongs to Hugging Face's distribution (kernels/__init__.py
steps aside when loaded under it). Standard library only.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
FOLDERS = {"mosaicbert_ds.kernels": "kernels", "mosaicbert_ds.benchmarks": "benchmarks"}
"""Installed name -> folder at the top of the repository (setup.cfg's package_dir)."""


class _SourceFolders(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name not in FOLDERS:
            return None
        source = REPO / FOLDERS[name] / "__init__.py"
        return importlib.util.spec_from_file_location(name, source, submodule_search_locations=[str(source.parent)])


def map_source_folders() -> None:
    """Install the finder when this is a source checkout whose kernels are not installed."""
    if not (REPO / "kernels" / "__init__.py").is_file():
        return  # an installed package: setup.cfg's package_dir did the mapping
    if importlib.util.find_spec("mosaicbert_ds.kernels") is not None:
        return  # an editable install maps them already
    if not any(isinstance(f, _SourceFolders) for f in sys.meta_path):
        sys.meta_path.append(_SourceFolders())
