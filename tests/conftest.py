import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402


def pytest_configure(config):
    # Tests use tiny tensors and `make test` runs two xdist workers on a 2-core machine: one intra-op
    # thread per process avoids oversubscription (tiny tensors get ~30x slower with threads fighting).
    import torch

    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _restore_logging():
    """Commands called in-process (`preprocessing.cli.main`, `wsi_ncmi.cli.main`) configure the root logger with
    a handler on the test's captured stderr, which pytest closes after the test; later records (Lightning's
    "Seed set to 0") would then print "--- Logging error ---" into the next test's stderr. Put the root and the
    lightning loggers back as they were."""
    import logging

    names = ("", "lightning", "lightning.pytorch", "lightning.fabric")
    saved = {n: (list(logging.getLogger(n).handlers), logging.getLogger(n).level, logging.getLogger(n).propagate)
             for n in names}
    yield
    for n, (handlers, level, propagate) in saved.items():
        lg = logging.getLogger(n)
        lg.handlers[:] = handlers
        lg.setLevel(level)
        lg.propagate = propagate
