"""The one base of every error the project raises about the user's input or settings.

A :class:`UserError` names the file, flag or setting at fault in a one-line message; the commands print it as
``wsi-ncmi <command>: error: <message>`` (exit 2) instead of a traceback. Everything else (a bug, an
``OSError`` the command does not name) is not one. A leaf: every layer, ``preprocessing`` included, may
import it.
"""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(ValueError):
    """A problem with what the user gave (a file, a flag, a setting); the message is one line naming it."""
