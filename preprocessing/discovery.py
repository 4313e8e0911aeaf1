"""Finding slides in a folder: files by extension, and folders that are one slide (DICOM WSI), recursively,
following folder links once, skipping the output folder and MIRAX tile folders; slide ids must be unique."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

from .readers import FOLDER_READERS, SLIDE_EXTENSIONS, SlideError, load_reader, slide_id_of

log = logging.getLogger(__name__)

__all__ = ["find_slides", "slide_paths"]


def _walk_error(e: OSError) -> None:
    log.warning("%s: cannot search this folder: %s", e.filename, e.strerror or e)


def find_slides(root: str | Path, extensions: Iterable[str] = SLIDE_EXTENSIONS,
                exclude: Iterable[str | Path] = ()) -> list[Path]:
    """All slides under ``root``: files, and folders that are one slide (recursive, following folder links; a folder
    reached twice, e.g. by a link cycle, is searched once and the link is logged), sorted by path. Raises if two
    share a slide id. Folders in ``exclude`` (the output folder inside the input: its thumbnails are not slides)
    are not searched."""
    root = Path(root)
    if not root.is_dir():
        raise SlideError(f"--input {root}: not a directory")
    skip = {os.path.realpath(p) for p in exclude}
    exts = {e.lower() for e in extensions}
    found: list[Path] = []
    seen_dirs: dict[tuple[int, int], Path] = {}  # (device, inode) of every folder walked: cuts link cycles
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=_walk_error):
        here = Path(dirpath)
        try:
            st = here.stat()
        except OSError as e:  # vanished meanwhile
            _walk_error(e)
            continue
        if (st.st_dev, st.st_ino) in seen_dirs:  # reached again through a link
            first = seen_dirs[(st.st_dev, st.st_ino)]
            log.warning("%s: not searched again: this folder link leads to %s, searched already (a loop or a "
                        "second link to the same folder)", here, first)
            dirnames[:] = []
            continue
        seen_dirs[(st.st_dev, st.st_ino)] = here
        dirnames.sort()
        # MIRAX keeps its tiles in a folder named like the .mrxs file; never descend into those
        dirnames[:] = [d for d in dirnames if not (here / (d + ".mrxs")).is_file()]
        for d in [d for d in dirnames if os.path.realpath(here / d) in skip]:
            log.warning("%s: not searched for slides: it is the output folder (inside --input)", here / d)
            dirnames.remove(d)
        for d in dirnames:
            if (here / d).is_symlink():
                log.info("%s: following folder link to %s", here / d, os.path.realpath(here / d))
        found += [here / f for f in filenames if Path(f).suffix.lower() in exts]
        for ext, spec in FOLDER_READERS.items():
            members = sorted(f for f in filenames if Path(f).suffix.lower() == ext)
            if members and load_reader(spec).is_slide_folder(here, members):
                found.append(here)
    found.sort()
    seen: dict[str, Path] = {}
    for p in found:
        sid = slide_id_of(p)
        if sid in seen:
            raise SlideError(f"slide id {sid!r} is used by two files: {seen[sid]} and {p}; rename one")
        seen[sid] = p
    return found


def slide_paths(slides_dir: str | Path, exclude: str | Path) -> dict[str, Path]:
    """``{slide_id: path}`` of the slides :func:`find_slides` finds under ``slides_dir`` (every reader's extension,
    OME-TIFF, CZI, DICOM WSI folders), not searching ``exclude`` (e.g. an output folder inside it)."""
    return {slide_id_of(p): p for p in find_slides(slides_dir, exclude=[exclude])}
