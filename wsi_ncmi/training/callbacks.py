"""Training callbacks: exact resume of the random number generators, an always-current ``last.ckpt``, and
checkpoint files that are never left half-written (:class:`AtomicCheckpointIO`).

Lightning checkpoints hold the model (incl. buffers such as the NCMI ``FeatureCenter`` and the centroids),
the optimizer, the schedulers and the loop counters, but not the global RNG states. ``RNGStateCheckpoint``
adds them (python ``random``, numpy, torch CPU and CUDA) so that ``ckpt_path=last`` continues with the
same shuffling and dropout as an uninterrupted run:

* the states are stored when a checkpoint is written and set again as soon as it is loaded;
* the sanity-check validation that Lightning runs before training draws from the torch RNG (each
  DataLoader iterator takes a base seed), so the callback makes the sanity check RNG-neutral: the states
  from before it are put back after it, in resumed and fresh runs alike.

Under DDP the checkpoint holds rank 0's states and every rank restores them (samplers are seeded by epoch,
so only dropout masks become identical across ranks after a resume).
States are stored as tensors / ints only, so checkpoints load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from wsi_ncmi.data.atomic import atomic_output
from wsi_ncmi.data.outputs import output_error

__all__ = ["AtomicCheckpointIO", "LastCheckpoint", "RNGStateCheckpoint", "capture_rng_state", "restore_rng_state"]

logger = logging.getLogger(__name__)


def capture_rng_state() -> dict[str, Any]:
    """The global RNG states as checkpoint-safe values (tensors, ints, floats, lists)."""
    py_version, py_state, py_gauss = random.getstate()
    # the legacy global numpy RNG is what seed_everything seeds and third-party code draws from
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()  # noqa: NPY002
    state: dict[str, Any] = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_kind, torch.from_numpy(np.asarray(np_keys, dtype=np.int64)), int(np_pos),
                  int(np_has_gauss), float(np_gauss)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set the global RNGs from :func:`capture_rng_state`'s output."""
    py_version, py_state, py_gauss = state["python"]
    random.setstate((int(py_version), tuple(int(v) for v in py_state), py_gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np_state = (str(kind), np.asarray(keys, dtype=np.int64).astype(np.uint32), int(pos), int(has_gauss), float(gauss))
    np.random.set_state(np_state)  # noqa: NPY002
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            logger.warning("RNG restore: checkpoint has %d CUDA RNG states for %d devices; CUDA RNG not restored",
                           len(cuda), torch.cuda.device_count())


class RNGStateCheckpoint(Callback):
    """Save / restore global RNG states with each checkpoint; keep the sanity check RNG-neutral."""

    def __init__(self) -> None:
        self._before_sanity: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"rng": capture_rng_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "rng" in state_dict:
            restore_rng_state(state_dict["rng"])
            logger.debug("restored RNG states from checkpoint")

    def on_sanity_check_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._before_sanity = capture_rng_state()

    def on_sanity_check_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._before_sanity is not None:
            restore_rng_state(self._before_sanity)
            self._before_sanity = None


class LastCheckpoint(ModelCheckpoint):
    """Write ``<dirpath>/last.ckpt`` after every validation, whether or not the monitored metric improved.

    Lightning's own ``save_last`` (2.6) only writes ``last.ckpt`` in a step where a top-k checkpoint was saved,
    so when the monitored metric stops improving ``last.ckpt`` lags behind and ``ckpt_path=last`` would resume
    from an older epoch. This callback has no monitor and keeps one file, overwritten each time.
    """

    def __init__(self, dirpath: str | None = None) -> None:
        super().__init__(dirpath=dirpath, filename=self.CHECKPOINT_NAME_LAST, monitor=None, save_top_k=1,
                         save_last=False, enable_version_counter=False)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Save checkpoints to a temporary file in the target's own folder, fsync it and rename it over the target.

    Lightning's local save goes through fsspec, which writes to the system temp folder and then copies the file
    into place: a full disk (or a kill) during the copy left a truncated ``best.ckpt`` / ``last.ckpt`` in place of
    the good one. Here the previous file stays intact until the new one is complete, and a failed write is an
    :class:`~wsi_ncmi.data.outputs.OutputError` naming the checkpoint (one line in `wsi-ncmi fit`).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):  # remote storage: Lightning's own way
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        path = Path(path)
        try:
            buffer = io.BytesIO()  # serialised first: a failed write is then an OSError (ENOSPC, ...), not a
            torch.save(checkpoint, buffer)  # RuntimeError of torch's C++ file writer
            with atomic_output(path) as tmp, open(tmp, "wb") as fh:
                fh.write(buffer.getbuffer())
        except OSError as exc:
            err = output_error(exc, path)
            if err is None:
                raise
            kept = f"; the previous {path.name} is kept" if path.is_file() else ""
            raise type(err)(f"{path}: cannot write the checkpoint: {exc.strerror or exc}{kept}") from exc
