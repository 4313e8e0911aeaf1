"""`wsi-ncmi` entry point: a table of sub-commands, each imported only when used.

Every sub-command lives in ``wsi_ncmi/commands/<name>_cli.py`` and exposes ``main(argv) -> int``.
Importing this module does no work (the torch/Lightning stack is loaded by the command that needs it).
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

# name -> (module, function, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "fit": ("wsi_ncmi.commands.train_cli", "main_fit", "train a MIL aggregator (CE or NCMI) from a YAML config"),
    "validate": ("wsi_ncmi.commands.train_cli", "main_validate", "run validation of a checkpoint"),
    "test": ("wsi_ncmi.commands.train_cli", "main_test", "run the test split of a checkpoint"),
    "evaluate": ("wsi_ncmi.commands.evaluate_cli", "main", "freeze a trained aggregator; LP / CC / head metrics + report"),
    "report": ("wsi_ncmi.commands.evaluate_cli", "main_report", "aggregate several evaluated runs into mean ± std"),
    "predict": ("wsi_ncmi.commands.predict_cli", "main", "predict on new slides or bags, with an out-of-distribution flag"),
    "heatmap": ("wsi_ncmi.commands.heatmap_cli", "main", "render attention heatmaps over a slide thumbnail"),
    "bags": ("wsi_ncmi.commands.bags_cli", "main", "inspect / validate a folder of HDF5 bags"),
    "splits": ("wsi_ncmi.commands.splits_cli", "main", "make / validate split tables"),
    "natural": ("wsi_ncmi.commands.natural_cli", "main", "natural-image track (CIFAR-100 / ImageFolder) fit/validate/test"),
    "ncmi-metric": ("wsi_ncmi.commands.ncmi_metric_cli", "main_ncmi_metric", "NCMI vs top-1 for pretrained image models"),
    "demo": ("wsi_ncmi.commands.demo_cli", "main", "the whole pipeline on built-in sample slides (CPU)"),
}


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: wsi-ncmi <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "Run `wsi-ncmi <command> --help` for the options of one command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=os.environ.get("WSI_NCMI_LOGLEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name in {"-V", "--version"}:
        from wsi_ncmi import __version__

        print(__version__)
        return 0
    if name not in COMMANDS:
        print(f"wsi-ncmi: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    command = getattr(importlib.import_module(module), func)
    _route_lightning_logs()
    rc = command(rest)
    return int(rc or 0)


def _route_lightning_logs() -> None:
    """Lightning attaches its own console handlers at import; send its records through ours only (no duplicates)."""
    if "lightning" not in sys.modules and "lightning.pytorch" not in sys.modules:
        return
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        lg = logging.getLogger(name)
        for handler in list(lg.handlers):
            if isinstance(handler, logging.StreamHandler):
                lg.removeHandler(handler)
        lg.propagate = True


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
