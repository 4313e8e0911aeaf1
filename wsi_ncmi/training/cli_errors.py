"""``OneLineParseErrors``: a LightningCLI whose bad command-line values are user errors of one line.

jsonargparse refuses a value that does not fit its option's type (a ``Literal[...]`` choice, a number, a path)
by printing the whole usage (a hundred lines) and exiting. Mixed into a ``LightningCLI`` subclass
(``class MyCLI(OneLineParseErrors, LightningCLI)``), its parsers raise instead and the error reaches the
command as a :class:`CLIArgumentError` (a :class:`~wsi_ncmi.errors.UserError`), which prints it as one line
naming the option, the value and what was expected. ``--help`` is unchanged.
"""

from __future__ import annotations

from argparse import ArgumentError
from typing import Any

from wsi_ncmi.errors import UserError

__all__ = ["CLIArgumentError", "OneLineParseErrors"]


class CLIArgumentError(UserError):
    """A command-line or config value the parser refused (the message names the option)."""


class OneLineParseErrors:
    """Mixin for a ``LightningCLI`` subclass: parse errors raise :class:`CLIArgumentError` (module docstring)."""

    def init_parser(self, **kwargs: Any) -> Any:
        kwargs.setdefault("exit_on_error", False)
        return super().init_parser(**kwargs)  # type: ignore[misc]

    def parse_arguments(self, parser: Any, args: Any) -> None:
        try:
            super().parse_arguments(parser, args)  # type: ignore[misc]
        except ArgumentError as err:
            raise CLIArgumentError(f"{err} (see --help)") from None

    def _parse_ckpt_path(self) -> None:  # Lightning's hook: a checkpoint's hyper-parameters parsed into the config
        try:
            super()._parse_ckpt_path()  # type: ignore[misc]
        except ArgumentError as err:
            raise CLIArgumentError(f"--ckpt_path: its hyper-parameters do not parse: {err}") from None
