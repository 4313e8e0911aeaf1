"""How the commands print a user error: one line, whatever the exception went through."""

from __future__ import annotations

__all__ = ["one_line"]


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` as one line.

    An error raised in a DataLoader worker reaches the main process re-wrapped with the worker's whole
    traceback (``Caught BagError in DataLoader worker process 0. Original Traceback ...``); its last line
    (``wsi_ncmi.data.bags.BagError: <file>: <problem>``) holds the original message, which is kept.
    """
    text = str(exc).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        head, sep, rest = last.partition(": ")
        text = rest if sep and head.rsplit(".", 1)[-1].endswith(("Error", "Exception")) else last
    return " ".join(text.split())
