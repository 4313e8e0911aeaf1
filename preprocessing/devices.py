"""``--devices``: one encoder process per device (every GPU of a node) over one output folder.

Each device gets its own process (spawned: CUDA must not be forked) running the ordinary pipeline
(:func:`preprocessing.extract.run`) with ``device`` set to that device and ``--workers`` split between the
processes. They share the slide queue through the per-slide locks the pipeline already takes: every process
walks the same largest-first slide list, a slide locked by another process is passed over at once, and one
finished meanwhile is found up to date after its lock is taken (``locks``, ``plan.bag_mismatch``). So each
slide is read and encoded by exactly one process, the bags are those of a one-process run, and every process
writes its rows into the one ``manifest.csv`` (its own file lock). The parent merges the processes' results.
"""

from __future__ import annotations

import logging
import multiprocessing
import queue as queue_mod
from dataclasses import replace
from typing import Any

from .config import ConfigError, PreprocessConfig
from .readers import SlideError
from .writer import RunResult

log = logging.getLogger(__name__)

__all__ = ["parse_devices", "split_workers", "merge_results", "run_on_devices"]


def parse_devices(spec: str) -> list[str]:
    """``"0,1"`` → ``["cuda:0", "cuda:1"]``; ``"all"`` → every visible GPU; ``"cpu,cpu"`` and ``"cuda:1"`` as
    given. Raises ConfigError naming ``--devices`` for an empty list, or GPUs that are not there."""
    parts = [p.strip() for p in str(spec).split(",") if p.strip()]
    if parts == ["all"]:
        import torch

        n = torch.cuda.device_count()
        if n == 0:
            raise ConfigError("--devices all: no CUDA device is visible (CUDA_VISIBLE_DEVICES, driver?)")
        return [f"cuda:{i}" for i in range(n)]
    if not parts:
        raise ConfigError(f"--devices {spec!r}: expected GPU indices (0,1,2,3), 'all' or e.g. 'cpu,cpu'")
    out = [f"cuda:{p}" if p.isdigit() else p for p in parts]
    gpus = [int(d.split(":")[1]) for d in out if d.startswith("cuda:") and d.split(":")[1].isdigit()]
    if gpus:
        import torch

        n = torch.cuda.device_count()
        missing = [g for g in gpus if g >= n]
        if missing:
            raise ConfigError(f"--devices {spec!r}: GPU {missing[0]} does not exist ({n} visible)")
    bad = [d for d in out if not (d == "cpu" or d == "cuda" or d.startswith("cuda:"))]
    if bad:
        raise ConfigError(f"--devices {spec!r}: {bad[0]!r} is not a GPU index, 'cpu' or 'cuda:N'")
    return out


def split_workers(workers: int, n: int) -> list[int]:
    """``workers`` DataLoader workers shared by ``n`` processes, as evenly as possible (at least 1 each when
    ``workers`` > 0)."""
    if workers <= 0:
        return [0] * n
    return [max(1, workers // n + (i < workers % n)) for i in range(n)]


def merge_results(results: list[RunResult]) -> RunResult:
    """One result for the run: a slide's status is the one of the process that did it (a process that found
    it up to date or locked by the other says ``skipped``, which only stands when nobody did it)."""
    out = RunResult()
    for r in results:
        out.written += r.written
        out.stopped = out.stopped or r.stopped
        for sid, status in r.statuses.items():
            if out.statuses.get(sid, "skipped") == "skipped":
                out.statuses[sid] = status
                out.messages.pop(sid, None)
                if sid in r.messages:
                    out.messages[sid] = r.messages[sid]
    out.missing_source = sorted({s for r in results for s in r.missing_source})
    out.locked = sorted({s for r in results for s in r.locked} - set(out.statuses))
    out.written.sort()
    return out


def _device_main(cfg: PreprocessConfig, i: int, results: Any, log_level: int, threads: int) -> None:
    """One device process: the ordinary pipeline; its RunResult (or its error) goes back to the parent."""
    logging.basicConfig(level=log_level, format=f"%(asctime)s %(levelname)s [{cfg.device}] %(name)s: %(message)s")
    if cfg.device == "cpu":  # as many threads as the parent: CPU results do not depend on who computed them
        import torch

        torch.set_num_threads(threads)
    from .extract import run

    try:
        results.put((i, True, run(cfg)))
    except Exception as e:  # reported by the parent, naming the device
        results.put((i, False, f"{type(e).__name__}: {e}" if not isinstance(e, ValueError) else str(e)))


def run_on_devices(cfg: PreprocessConfig) -> RunResult:
    """Run ``cfg`` with one process per device of ``cfg.devices``; one device runs in this process."""
    devices = parse_devices(cfg.devices or "")
    if len(devices) == 1:
        from .extract import run

        return run(replace(cfg, device=devices[0], devices=None))
    import torch

    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    level = logging.getLogger().getEffectiveLevel()
    procs = []
    for i, (dev, w) in enumerate(zip(devices, split_workers(cfg.workers, len(devices)))):
        sub = replace(cfg, device=dev, devices=None, workers=w)
        p = ctx.Process(target=_device_main, args=(sub, i, results, level, torch.get_num_threads()),
                        name=f"wsi-preprocess[{dev}]")
        p.start()
        procs.append(p)
    log.info("%d encoder processes on %s, %s DataLoader workers", len(procs), ", ".join(devices),
             "+".join(str(w) for w in split_workers(cfg.workers, len(devices))))
    got: dict[int, tuple[bool, Any]] = {}
    while len(got) < len(procs):
        try:
            i, ok, payload = results.get(timeout=1.0)
            got[i] = (ok, payload)
        except queue_mod.Empty:
            if all(p.exitcode is not None for p in procs):  # every process ended; their results were flushed
                try:
                    while len(got) < len(procs):
                        i, ok, payload = results.get(timeout=1.0)
                        got[i] = (ok, payload)
                except queue_mod.Empty:
                    break
    for p in procs:
        p.join()
    for i, p in enumerate(procs):
        if i not in got:
            raise SlideError(f"the encoder process for device {devices[i]} died (exit code {p.exitcode}); slides it "
                             "did not finish are still pending: rerun the same command to finish them")
        if not got[i][0]:
            raise SlideError(f"device {devices[i]}: {got[i][1]}")
    return merge_results([got[i][1] for i in range(len(procs))])
