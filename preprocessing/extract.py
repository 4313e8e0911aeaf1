"""The pipeline: slides → tissue → tiles → features → one HDF5 bag per slide, resumable and shareable.

Design (one DataLoader for the whole run). Modules: :mod:`preprocessing.plan` (the slide list and the
settings fingerprints used for resume), :mod:`preprocessing.stream` (the reading side, ``SlideStream``),
:mod:`preprocessing.writer` (the main process's side of each slide: bag, coords and manifest writing, stale
bags, lock release; ``RunResult``) and this one (the main loop: skip up-to-date bags, the encoder, the
DataLoader passes, recovery from dead workers).

* ``SlideStream`` is an ``IterableDataset`` over the pending slides. The DataLoader workers take slides
  from one shared queue (a counter in shared memory), largest file first, so a worker that finishes early
  takes the next slide instead of idling while another works through a fixed share (longest-first
  scheduling keeps the tail short when slide sizes differ). A worker takes the slide's lock, opens the slide once, segments tissue, plans
  the tiles, writes the overview PNG, then yields the tiles as uint8 batches ``[B, P, P, 3]`` tagged with
  the slide, and finally one ``end`` message (status, coords, tissue fractions, bad tiles, geometry).
  A worker writes each tile straight into a batch tensor allocated in shared memory, so handing it to the
  main process copies nothing; the tile indices travel as a numpy array inside the message. Each worker
  refills a small pool of such batches once the main loop has released them (``SlideStream.release``): a
  fresh shared-memory batch costs ~0.2-0.3 ms of page faults per 256-px tile.
* Tiles are resized to the target mpp in the worker (cv2 ``INTER_AREA``, ~0.12 ms per 512² → 256² tile on
  one core, a small fraction of the decode): shipping raw regions for a device-side resize would multiply
  the shared-memory and host-to-device traffic by ``(read_size / patch_size)²`` (4x for 0.25 → 0.5 µm/px).
  Regions of tiled TIFF levels are decoded straight from the file's tiles (``tiff_tiles``), bit-identical
  to OpenSlide and ~4x cheaper per tile. ``--read-path fast`` (default) decodes JPEG tiles at 1/2, 1/4 or 1/8
  scale instead when the resize is exactly that factor (``jpeg_tiles``; ~1.5x cheaper, not bit-identical).
  ``--jpeg-decode device`` sends regions made of whole JPEG tiles undecoded (``jpeg`` messages) and the main
  process decodes them on the encoder's device (:mod:`preprocessing.device_decode`).
* The main process moves each batch to the device (pinned memory, ``non_blocking``), normalises there and
  runs the encoder, collecting features per slide; on a slide's ``end`` it writes the bag atomically,
  updates the manifest and releases the lock. Workers run ahead by ``prefetch_factor`` batches each and
  own different slides, so the next slides are read and segmented while the model works on the current
  one. ``in_order=False`` lets a fast worker's batches pass a slow one's; per-worker order (tiles before
  their ``end``) is all the main loop relies on.
* A tile whose region fails to decode is dropped and counted in ``bad_tiles`` (logged, never replaced by
  white). Thumbnail regions that fail to decode are not taken for glass: their tiles are tried too (and
  counted as bad when they fail). A slide that cannot be opened gets status ``unreadable``; the run goes on.
* Features stay on the device (in the stored dtype) until the slide's ``end``: no per-batch host sync.
* A slide that is (re)processed and ends ``error``/``unreadable``/``mpp_missing``/``no_tissue`` has its
  previous bag moved from ``bags/`` to ``stale/<slide_id>.h5`` (``stale/<slide_id>.<UTC time>.h5`` when one is
  there already: a retired bag is never overwritten; logged, noted in the manifest message),
  so a bag made with other settings never stays where training reads bags.
* ``--stages seg,tile`` writes ``coords/<id>.h5`` (tile grid, tissue fractions, reading plan, tiling
  settings); a later ``--stages extract`` run reuses it when the tiling settings, mpp and source file
  (size + mtime) match, else it tiles again (logged). So tiling can run on CPU nodes and extraction on GPUs.
* A DataLoader worker that dies hard (e.g. a segfault inside OpenSlide) does not end the run: the slide
  it was reading (known from a small shared table of worker -> slide) is recorded as ``error`` naming the
  dead process, and the slides not yet finished are read again by a fresh DataLoader.

``workers=0`` runs the same stream in the main process (no read-ahead) — used by the tests.
``--devices 0,1,...`` runs this whole loop once per device, each in its own process, sharing the slides through
the per-slide locks (:mod:`preprocessing.devices`).
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from .config import PreprocessConfig
from .device_decode import DeviceDecoder
from .encoder_specs import EncoderError, check_recipe, resolve_spec
from .encoder_weights import RANDOM, sha256_file
from .encoders import Encoder, build_encoder
from .locks import release_lock
from .manifest import MISSING_SOURCE, Manifest
from .outdir import OUTPUT_SUBDIRS, check_writable, claim_folder, folder_settings
from .plan import BAGS_DIR, LOCKS_DIR, SlideTask, bag_mismatch, plan_slides, settings_fingerprint
from .readers import SlideError
from .stream import SlideStream, read_tile
from .writer import FAILED_STATUSES, RunResult, SlideWriter, retire_all_bags

log = logging.getLogger(__name__)

FAIL_FAST_STATUSES = FAILED_STATUSES

__all__ = ["run"]


def _mark_missing_sources(manifest: Manifest, planned: set[str], input_dir: str) -> list[str]:
    """Rows of slides under ``input_dir`` that this run did not find and whose file no longer exists become
    ``missing_source`` (their bags are left where they are); returns their slide ids. Rows of other input
    folders (several runs can share one output folder) are left alone."""
    root = os.path.abspath(input_dir)

    def gone_from_input(path: str) -> bool:
        p = os.path.abspath(path)
        return os.path.commonpath([p, root]) == root and not os.path.lexists(p)

    gone = [row for sid, row in manifest.rows().items()
            if sid not in planned and row.get("status") != MISSING_SOURCE and row.get("path")
            and gone_from_input(row["path"])]
    if not gone:
        return []
    marked = []
    for row in gone:
        was = row.get("status", "")
        kept = f"; its bag {BAGS_DIR}/{row['slide_id']}.h5 is kept" if was == "ok" else ""
        marked.append({**row, "status": MISSING_SOURCE,
                       "message": f"{row['path']}: the slide file is gone (deleted or moved); status was {was}{kept}"})
        log.warning("%s: the slide file %s is gone (deleted or moved); marked %s in %s",
                    row["slide_id"], row["path"], MISSING_SOURCE, manifest.path)
    manifest.update_many(marked)
    return [r["slide_id"] for r in gone]


def _claim(out: Path, fp: dict[str, Any], extract: bool, overwrite: bool, redo: list[SlideTask]) -> dict[str, Any]:
    """Check this run's settings against the folder's record (:mod:`preprocessing.outdir`); with ``--overwrite``
    and other settings, the bags of slides this run does not redo are moved to ``stale/`` first. Returns the
    folder-wide settings."""
    folder = folder_settings(fp, extract)
    if claim_folder(out, folder, overwrite):
        retire_all_bags(out, keep={t.slide_id for t in redo})
    return folder


def _identity(msg: dict[str, Any]) -> dict[str, Any]:
    return msg  # no default_convert: numpy arrays and plans travel as they are


def _weights_sha(cfg: PreprocessConfig) -> str:
    if cfg.weights is None:
        return ""
    if cfg.weights == RANDOM:
        return RANDOM
    path = Path(cfg.weights)
    if not path.is_file():
        what = "is a folder, expected a weight file" if path.is_dir() else "no such file"
        raise EncoderError(f"--weights {path}: {what}")
    try:
        return sha256_file(path)
    except OSError as e:
        raise EncoderError(f"--weights {path}: cannot read the file ({e.strerror or e})") from None


def _loader_kwargs() -> dict[str, Any]:
    """``in_order=False`` (torch >= 2.6) lets a fast worker's batches pass a slow one's; older torch keeps
    the round-robin order, which is only slower when slides differ in size."""
    return {"in_order": False} if "in_order" in inspect.signature(DataLoader.__init__).parameters else {}


_WORKER_DIED = re.compile(r"DataLoader worker \(pid(?:\(s\))? ([\d, ]+)\)")


def _dead_worker_pids(e: BaseException) -> set[int] | None:
    """The pids named by torch's "DataLoader worker (pid ...) exited unexpectedly / is killed by signal"
    error, or None when ``e`` is not that error."""
    m = _WORKER_DIED.search(str(e)) if isinstance(e, RuntimeError) else None
    return None if m is None else {int(p) for p in re.findall(r"\d+", m.group(1))}


@contextmanager
def _quiet_sigchld() -> Iterator[None]:
    """Replace torch's SIGCHLD handler while our loader runs. That handler raises "worker died" at whatever
    line the main thread is on (half-way through writing a bag, or blaming the slide being written); without
    it the DataLoader still notices a dead worker, at a defined place: ``next()`` after at most 5 s."""
    if not hasattr(signal, "SIGCHLD") or threading.current_thread() is not threading.main_thread():
        yield
        return
    prev = signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    try:
        yield
    finally:
        signal.signal(signal.SIGCHLD, prev)


def run(cfg: PreprocessConfig) -> RunResult:
    """Process every pending slide of ``cfg``; returns statuses (also in ``OUT/manifest.csv``).
    ``cfg.devices``: one such run per device in its own process (:mod:`preprocessing.devices`)."""
    cfg.validate()
    if cfg.devices:
        from .devices import run_on_devices

        return run_on_devices(cfg)
    out = Path(cfg.output)
    if out.exists() and not out.is_dir():
        raise SlideError(f"--output {out}: exists and is not a folder; give a folder path (it is created if "
                         "needed)")
    tasks = plan_slides(cfg)  # reads --input, --slides and --mpp-csv: their errors come before any output
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SlideError(f"--output {out}: cannot create the folder: {e.strerror or e}") from None
    check_writable(out, OUTPUT_SUBDIRS)  # a read-only folder fails here, before any slide is read
    result = RunResult()
    extract = "extract" in cfg.stage_set
    if extract:
        # unknown names / bad overrides fail before any slide work; tiles off the published recipe are warned about
        check_recipe(resolve_spec(cfg.encoder, cfg.encoder_kwargs_dict, cfg.mean, cfg.std, cfg.input_size),
                     cfg.patch_size, cfg.target_mpp)
        if cfg.weights is None:
            build_encoder(cfg.encoder, None)  # raises the clear "needs --weights" error
    fp = settings_fingerprint(cfg, _weights_sha(cfg))
    claim_folder(out, folder_settings(fp, extract), cfg.overwrite, record=False)  # other settings: refused now
    manifest = Manifest(out / "manifest.csv")
    result.missing_source = _mark_missing_sources(manifest, {t.slide_id for t in tasks}, cfg.input)
    pending: list[SlideTask] = []
    for t in tasks:
        why = "overwrite requested" if cfg.overwrite else (
            bag_mismatch(out / BAGS_DIR / f"{t.slide_id}.h5", fp, t) if extract else "no extract stage")
        if why is None:
            result.statuses[t.slide_id] = "skipped"
            manifest.update({"slide_id": t.slide_id, "path": str(t.path), "status": "skipped",
                             "message": "bag up to date"}, keep_ok=True)
            log.info("%s: bag up to date, skipped", t.slide_id)
            continue
        if why != "no bag yet":
            log.info("%s: redoing (%s)", t.slide_id, why)
        pending.append(t)
    log.info("%d slide(s) in shard %s, %d pending", len(tasks), cfg.shard, len(pending))
    if not pending:
        _claim(out, fp, extract, cfg.overwrite, [])  # every bag matches these settings: the folder's record agrees
        return result
    pending = [SlideTask(k, t.slide_id, t.path, t.mpp_override) for k, t in enumerate(pending)]
    encoder = build_encoder(cfg.encoder, cfg.weights, cfg.device, cfg.precision, cfg.compile,
                            kwargs=cfg.encoder_kwargs_dict, mean=cfg.mean, std=cfg.std, input_size=cfg.input_size,
                            tile_size=cfg.patch_size) if extract else None
    folder = _claim(out, fp, extract, cfg.overwrite, pending)  # after the weights were checked: no bad file recorded
    writer = SlideWriter(cfg, pending, fp, encoder, out, result, folder)
    jpeg = DeviceDecoder(encoder.device, pending, read_tile, cfg.read_path == "fast") \
        if encoder is not None and cfg.jpeg_decode == "device" else None
    from tqdm.auto import tqdm

    slides_bar = tqdm(total=len(pending), desc="slides", unit="slide", disable=not cfg.progress)
    tiles_bar = tqdm(desc="tiles", unit="tile", disable=not cfg.progress or not extract)
    todo, ended = list(pending), set()
    try:
        while todo:
            todo = _run_loader(cfg, todo, fp, encoder, writer, out, ended, slides_bar, tiles_bar, jpeg)
            if result.stopped:
                break
    finally:
        slides_bar.close()
        tiles_bar.close()
        if jpeg is not None:
            jpeg.close()
        for t in pending:  # locks this process still holds (interrupted run)
            release_lock(out / LOCKS_DIR / f"{t.slide_id}.lock", os.getpid())
    return result


def _consume(cfg: PreprocessConfig, it: Iterator[dict[str, Any]], writer: SlideWriter, ended: set[int],
             slides_bar: Any, tiles_bar: Any, stream: SlideStream, jpeg: DeviceDecoder | None) -> list[SlideTask]:
    for msg in it:
        if msg["kind"] == "jpeg":  # --jpeg-decode device: decoded here, on the encoder's device
            assert jpeg is not None
            msg = jpeg.tiles(msg)
        if msg["kind"] == "tiles":
            if len(msg["index"]):
                tiles_bar.update(writer.tiles(msg))
            stream.release(msg)  # encoded (or copied to pinned memory): the worker may refill that batch
            tiles_bar.set_postfix_str(writer.tasks[msg["slide"]].slide_id, refresh=False)
            continue
        if jpeg is not None:
            jpeg.end(msg)  # tiles it dropped join the slide's bad ones
        status = writer.end(msg)
        ended.add(msg["slide"])
        slides_bar.update(1)
        if writer.result.stopped:  # a full disk / a folder taken over: every next slide would fail too
            return []
        if cfg.fail_fast and status in FAIL_FAST_STATUSES:
            writer.result.stopped = (f"--fail-fast: {writer.tasks[msg['slide']].slide_id} ended with status "
                                     f"{status}: {msg['message']}")
            return []
    return []


def _run_loader(cfg: PreprocessConfig, todo: list[SlideTask], fp: dict[str, Any], encoder: Encoder | None,
                writer: SlideWriter, out: Path, ended: set[int], slides_bar: Any, tiles_bar: Any,
                jpeg: DeviceDecoder | None = None) -> list[SlideTask]:
    """One DataLoader over ``todo``. Returns the slides still to do: [] normally; after a worker died, the
    unfinished slides except the dead worker's (which are recorded as ``error``)."""
    workers = min(cfg.workers, len(todo))
    stream = SlideStream(todo, cfg, fp, os.getpid(), out, workers=workers)
    cuda = encoder is not None and encoder.device.type == "cuda"
    loader = DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=cuda,
                        prefetch_factor=4 if workers else None, collate_fn=_identity, **_loader_kwargs())
    it = iter(loader)  # starts the workers (and installs torch's SIGCHLD handler once per process)
    with _quiet_sigchld():  # ... which is muted while we consume the loader
        try:
            return _consume(cfg, it, writer, ended, slides_bar, tiles_bar, stream, jpeg)
        except RuntimeError as e:
            pids = _dead_worker_pids(e)
            if pids is None or workers == 0:
                raise
            dead = [i for i in stream.slides_of_dead_workers(pids) if i not in ended]
            if not dead:  # pids not found in the table: blame every slide still being read
                dead = [i for i in stream.slides_in_flight() if i not in ended]
            if not dead:
                raise SlideError(f"a DataLoader worker died ({e}) but no slide was being read") from e
            reason = str(e)
        finally:
            shutdown = getattr(it, "_shutdown_workers", None)  # join / terminate the workers now
            if shutdown is not None:
                shutdown()
    log.error("a slide reader process died (%s) while reading %s; recording it as error and going on",
              reason, ", ".join(writer.tasks[i].slide_id for i in dead))
    for i in dead:
        task = writer.tasks[i]
        writer.end({"kind": "end", "slide": i, "status": "error", "t0": time.time(),
                    "message": f"{task.path}: the reader process died while reading this slide ({reason}); "
                               "the file may crash the slide library (e.g. OpenSlide) - check or convert it"})
        ended.add(i)
        slides_bar.update(1)
        if jpeg is not None:
            jpeg.forget(i)
    rest = [t for t in todo if t.index not in ended]
    for t in rest:  # their worker may have locked them and sent partial features: start them afresh
        writer.parts.pop(t.index, None)
        if jpeg is not None:
            jpeg.forget(t.index)
        release_lock(out / LOCKS_DIR / f"{t.slide_id}.lock", os.getpid())
    log.warning("restarting the readers for %d unfinished slide(s)", len(rest))
    return rest
