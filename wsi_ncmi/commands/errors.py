"""How the commands print a user error: one line, whatever the exception went through."""

from __future__ import annotations

import os

__all__ = ["MAX_CHARS", "one_line", "write_failure"]

#: an error line longer than this is cut (a list of a million class ids once made a 7.9 MB line)
MAX_CHARS = 2000


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` as one line of at most :data:`MAX_CHARS` characters.

    An error raised in a DataLoader worker reaches the main process re-wrapped with the worker's whole
    traceback (``Caught BagError in DataLoader worker process 0. Original Traceback ...``); its last line
    (``wsi_ncmi.data.bags.BagError: <file>: <problem>``) holds the original message, which is kept.
    """
    text = str(exc).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        head, sep, rest = last.partition(": ")
        text = rest if sep and head.rsplit(".", 1)[-1].endswith(("Error", "Exception")) else last
    text = " ".join(text.split())
    if len(text) > MAX_CHARS:
        text = f"{text[:MAX_CHARS]} ... ({len(text) - MAX_CHARS} more characters)"
    return text


def write_failure(exc: OSError, where: str | os.PathLike | None) -> str | None:
    """The one-line message of a failed write (disk full, read-only, permission, a file where a folder is
    needed), naming the file or else ``where`` (the command's output); None for other ``OSError``s (bugs)."""
    from wsi_ncmi.data.outputs import output_error

    err = output_error(exc, where if where is not None else "the output folder")
    return None if err is None else one_line(err)
