"""Cheap checks on a slide file before any decoder sees it: may this process read it, what image size does
its header declare (plain images are decoded whole, so a huge declared size is refused first)."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = ["MAX_DECODE_PIXELS", "unreadable_reason", "declared_image_size"]

# plain images are decoded whole into memory: 3 bytes per pixel (OpenCV refuses more than this by default)
MAX_DECODE_PIXELS = 1 << 30


def declared_image_size(path: Path) -> tuple[int, int] | None:
    """(width, height) a PNG or TIFF header declares, read without decoding; None when unknown."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(24)
        if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
            return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
        if head[:4] in (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+"):
            import tifffile

            with tifffile.TiffFile(path) as tif:
                page = tif.pages[0]
                return int(page.imagewidth), int(page.imagelength)
    except Exception as e:  # noqa: BLE001 - only a pre-check: the decoder reports a broken file
        log.debug("%s: image size not known before decoding: %s", path, e)
    return None


def unreadable_reason(path: Path) -> str | None:
    """Why this process may not read ``path`` as one clear line naming it, or None when it can (OpenSlide would
    only say "Unsupported or missing image file")."""
    try:
        with open(path, "rb") as fh:
            fh.read(1)
    except PermissionError:
        return (f"{path}: permission denied: this user cannot read the file; make it readable (e.g. chmod a+r) "
                "or run as a user who can")
    except OSError as e:
        return f"{path}: cannot read the file: {e.strerror or e}"
    return None
