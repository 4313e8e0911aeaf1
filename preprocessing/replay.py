"""Rebuild a ``PreprocessConfig`` from the settings fingerprint stored in bags (``settings_json``).

``wsi-ncmi predict --slides-dir`` uses it (:func:`replay`: check the weight file, rebuild the config, run) to
extract features from new slides with exactly the settings the training bags were made with: encoder (and its effective kwargs, mean/std, input size), tile size, µm/px,
overlap, tissue detection, the read path and the stored dtype. The candidate configuration is checked by recomputing its
fingerprint: every key must equal the recorded one except ``compute_precision`` (it follows the device:
CPU always runs fp32) and ``weights_sha256`` (checked against the weight file given, see
:func:`check_weights`).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from wsi_ncmi.errors import UserError

from .config import ConfigError, PreprocessConfig
from .encoder_weights import RANDOM, sha256_file
from .plan import IMPLIED_SETTINGS, settings_fingerprint

__all__ = ["ReplayError", "check_weights", "config_from_settings", "fingerprint_diff", "replay"]

log = logging.getLogger(__name__)

_NOT_COMPARED = frozenset({"compute_precision", "weights_sha256"})


class ReplayError(UserError):
    """The recorded settings cannot be reproduced (unknown encoder, changed defaults, other weights)."""


def check_weights(weights: str, recorded_sha256: str | None) -> str:
    """SHA-256 of ``weights`` (``"random"`` stays as it is); raises when it differs from the recorded one."""
    sha = RANDOM if weights == RANDOM else sha256_file(weights) if Path(weights).is_file() else None
    if sha is None:
        raise ReplayError(f"--weights {weights}: no such file")
    if recorded_sha256 and sha != recorded_sha256:
        raise ReplayError(f"--weights {weights}: SHA-256 {sha[:16]}… but the training bags were made with weights "
                          f"{str(recorded_sha256)[:16]}…")
    return sha


def fingerprint_diff(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """Keys (except precision and weights) whose values differ between two settings fingerprints."""
    a, b = {**IMPLIED_SETTINGS, **a}, {**IMPLIED_SETTINGS, **b}  # keys older bags do not record
    return sorted(k for k in set(a) | set(b) if k not in _NOT_COMPARED and a.get(k) != b.get(k))


def config_from_settings(settings: Mapping[str, Any], **options: Any) -> PreprocessConfig:
    """A ``PreprocessConfig`` reproducing ``settings`` (a bag's ``settings_json``); ``options`` are the
    run-only fields (``input``, ``output``, ``weights``, ``device``, ``workers``, ``slides``, …)."""
    clash = sorted(set(options) & {"encoder", "target_mpp", "patch_size", "overlap", "min_tissue", "mpp_tolerance",
                                   "tissue_method", "tissue_threshold", "seg_mpp", "features_dtype",
                                   "encoder_kwargs", "mean", "std", "input_size", "read_path",
                                   "jpeg_decode"})
    if clash:
        raise ReplayError(f"config_from_settings: {clash} come from the recorded settings, not from options")
    try:
        tissue = dict(settings.get("tissue") or {})
        fixed = dict(
            encoder=str(settings["encoder"]), target_mpp=float(settings["target_mpp"]),
            patch_size=int(settings["patch_size"]), overlap=int(settings.get("overlap", 0)),
            min_tissue=float(settings["min_tissue"]), mpp_tolerance=float(settings["mpp_tolerance"]),
            tissue_method=str(tissue.get("method", "otsu")), tissue_threshold=int(tissue.get("threshold", 8)),
            seg_mpp=float(tissue.get("seg_mpp", 8.0)), features_dtype=str(settings.get("features_dtype", "float16")),
            read_path=str(settings.get("read_path", IMPLIED_SETTINGS["read_path"])),
            jpeg_decode=str(settings.get("jpeg_decode", IMPLIED_SETTINGS["jpeg_decode"])),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ReplayError(f"recorded preprocessing settings are incomplete ({exc!r}): {dict(settings)}") from exc
    if settings.get("compute_precision") in ("bf16", "fp16", "fp32") and "precision" not in options:
        options["precision"] = settings["compute_precision"]
    # overrides are only passed when the encoder's own defaults do not already give the recorded values
    choices = [
        [{}, {"encoder_kwargs": dict(settings.get("encoder_kwargs") or {})}],
        [{}, {"mean": settings.get("mean"), "std": settings.get("std")}],
        [{}, {"input_size": settings.get("input_size")}],
    ]
    sha = str(settings.get("weights_sha256") or "")
    best: tuple[list[str], PreprocessConfig] | None = None
    for combo in itertools.product(*choices):
        kw = {k: v for part in combo for k, v in part.items() if v not in (None, {})}
        try:
            cfg = PreprocessConfig(**fixed, **kw, **options).validate()
            diff = fingerprint_diff(settings_fingerprint(cfg, sha), settings)
        except (ConfigError, ValueError) as exc:
            log.debug("replay candidate %s rejected: %s", kw, exc)
            continue
        if not diff:
            return cfg
        if best is None or len(diff) < len(best[0]):
            best = (diff, cfg)
    detail = f"; closest candidate differs in {best[0]}" if best else ""
    raise ReplayError(f"cannot reproduce the recorded preprocessing settings with this version{detail}: "
                      f"{dict(settings)}")


def replay(settings: Mapping[str, Any], *, input: str, output: str, weights: str, check_sha: bool = True,
           **options: Any) -> Any:
    """Preprocess the slides of ``input`` into ``output`` with the recorded ``settings`` (resumable: finished slides
    are skipped) and return the run's ``RunResult`` (``statuses``, ``failed()``). ``weights`` must be the recorded
    file (by SHA-256) unless ``check_sha`` is False; ``options``: the other run-only fields (``device``,
    ``workers``, ``batch_size``, ``slides``, ``progress``, …)."""
    from .extract import run

    if check_sha:
        check_weights(weights, settings.get("weights_sha256"))
    return run(config_from_settings(settings, input=input, output=output, weights=weights, **options))
