"""`wsi-ncmi fit | validate | test`: the command over :class:`wsi_ncmi.training.cli.MILCLI`.

    wsi-ncmi fit -c configs/mil/camelyon17/abmil_ncmi.yaml --data.bags_dir BAGS --data.split_csv SPLIT.csv
    wsi-ncmi test -c configs/mil/camelyon17/abmil_ncmi.yaml --data.bags_dir ... --data.split_csv ... \\
        --ckpt_path runs/c17_abmil_ncmi/checkpoints/best.ckpt

The run folder, the config composition and the pre-flight checks are described in
:mod:`wsi_ncmi.training.cli`. Errors are printed as one line and the command returns 2.
"""

from __future__ import annotations

import sys

from wsi_ncmi.commands.errors import one_line, write_failure
from wsi_ncmi.errors import UserError
from wsi_ncmi.training.cli import run_cli

__all__ = ["main_fit", "main_test", "main_validate"]



def _run_folder(argv: list[str]) -> str | None:
    """The ``--trainer.default_root_dir`` given on the command line (named when a write fails), or None."""
    for i, arg in enumerate(argv):
        if arg == "--trainer.default_root_dir" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--trainer.default_root_dir="):
            return arg.split("=", 1)[1]
    return None


def _main(subcommand: str, argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        run_cli(subcommand, argv)
    except UserError as exc:
        print(f"wsi-ncmi {subcommand}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # disk full, read-only, ... while writing the run folder
        line = write_failure(exc, _run_folder(argv) or "the run folder (--trainer.default_root_dir)")
        if line is None:
            raise
        print(f"wsi-ncmi {subcommand}: error: {line}", file=sys.stderr)
        return 2
    return 0


def main_fit(argv: list[str] | None = None) -> int:
    """`wsi-ncmi fit ...`: train (argv without the sub-command name)."""
    return _main("fit", argv)


def main_validate(argv: list[str] | None = None) -> int:
    """`wsi-ncmi validate ...`: validation metrics of ``--ckpt_path``."""
    return _main("validate", argv)


def main_test(argv: list[str] | None = None) -> int:
    """`wsi-ncmi test ...`: test-split metrics of ``--ckpt_path``."""
    return _main("test", argv)
