"""Benchmarks and reports (`mosaicbert-ds bench`); installed as mosaicbert_ds.benchmarks.

From the repository root the same modules run as `python -m benchmarks.NAME`. Every benchmark
that writes JSON records its provenance (benchmarks.provenance: commit, dirty flag, command line,
versions); results live in benchmarks/results/<hardware>_<date>/ with a generated report.md.
"""
