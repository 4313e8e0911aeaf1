"""The `make demo` path: a sample cohort built from real stained tissue, and the whole pipeline on it.

* :mod:`wsi_ncmi.demo.cohort`: :func:`build_cohort` writes pyramidal slides with ground-truth masks.
* :mod:`wsi_ncmi.demo.pipeline`: :func:`run_demo` chains cohort -> preprocessing -> split -> training
  -> evaluation -> report -> heatmaps (the stages in :mod:`wsi_ncmi.demo.stages`, settings and results in
  :mod:`wsi_ncmi.demo.config`, the demo's report ``demo.md`` in :mod:`wsi_ncmi.demo.summary`).

Nothing is imported at package import time; import the submodule you need.
"""
