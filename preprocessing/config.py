"""Settings of one ``wsi-preprocess`` run: a dataclass whose fields are the CLI flags and YAML keys."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from wsi_ncmi.errors import UserError

__all__ = ["ConfigError", "PreprocessConfig", "load_yaml", "STAGES", "READ_PATHS", "JPEG_DECODES"]

STAGES = ("seg", "tile", "extract")
READ_PATHS = ("fast", "exact")
JPEG_DECODES = ("cpu", "device")  # where the JPEG tiles of whole-tile regions are decoded


class ConfigError(UserError):
    """An invalid setting; the message names the flag / YAML key."""


def _default_workers() -> int:
    return max(0, min(8, (os.cpu_count() or 1) - 1))


@dataclass
class PreprocessConfig:
    input: str = ""
    output: str = ""
    target_mpp: float = 0.5
    patch_size: int = 256
    overlap: int = 0
    encoder: str = "resnet50_trunc"
    weights: str | None = None
    encoder_kwargs: Any = None  # JSON object (flag) or mapping (YAML) passed to timm.create_model
    mean: list[float] | None = None  # R G B on the 0..1 scale; None: the encoder's own
    std: list[float] | None = None
    input_size: int | None = None  # side tiles are resized to on the device; 0: no resize; None: the encoder's
    batch_size: int = 256
    workers: int = field(default_factory=_default_workers)
    device: str = "auto"
    precision: str | None = None  # CUDA autocast; None: the preset's published precision (else bf16)
    features_dtype: str = "float16"
    compile: bool = False
    read_path: str = "fast"  # fast: JPEG tiles decoded at 1/2, 1/4, 1/8 scale when the resize is that factor
    jpeg_decode: str = "cpu"  # device: whole-tile JPEG regions decoded in the encoder process (nvJPEG on CUDA)
    devices: str | None = None  # "0,1,2,3" / "all" / "cpu,cpu": one encoder process per device
    min_tissue: float = 0.1
    tissue_method: str = "otsu"
    tissue_threshold: int = 8
    seg_mpp: float = 8.0
    mpp_tolerance: float = 0.05
    max_side_px: int = 500_000  # slides declaring a larger level 0 (width or height) are refused
    max_gigapixels: float = 100.0  # ... or a larger level-0 area (1e9 px)
    mpp_csv: str | None = None
    slides: str | None = None
    shard: str = "0/1"
    stages: str = "seg,tile,extract"
    overwrite: bool = False
    fail_fast: bool = False
    lock_timeout: float = 6 * 3600.0
    progress: bool = True

    @property
    def stage_set(self) -> frozenset[str]:
        return frozenset(s.strip() for s in self.stages.split(",") if s.strip())

    @property
    def encoder_kwargs_dict(self) -> dict[str, Any]:
        """``encoder_kwargs`` as a dict (parsed from JSON when given as a string)."""
        v = self.encoder_kwargs
        if v is None or v == "":
            return {}
        if isinstance(v, str):
            try:
                v = json.loads(v)
            except ValueError as e:
                raise ConfigError(f"--encoder-kwargs {self.encoder_kwargs!r}: not valid JSON: {e}") from None
        if not isinstance(v, dict):
            raise ConfigError(f"--encoder-kwargs {self.encoder_kwargs!r}: expected a JSON object, e.g. "
                              '\'{"init_values": 1e-5}\'')
        return dict(v)

    @property
    def shard_index(self) -> tuple[int, int]:
        try:
            i, n = (int(v) for v in str(self.shard).split("/"))
        except ValueError:
            raise ConfigError(f"--shard {self.shard!r}: expected i/n, e.g. 0/4") from None
        return i, n

    def validate(self) -> PreprocessConfig:
        if not self.input or not self.output:
            raise ConfigError("--input and --output are required")
        if self.target_mpp <= 0:
            raise ConfigError(f"--target-mpp must be > 0, got {self.target_mpp}")
        if self.patch_size < 8:
            raise ConfigError(f"--patch-size must be >= 8, got {self.patch_size}")
        if not 0 <= self.overlap < self.patch_size:
            raise ConfigError(f"--overlap must be in [0, patch_size), got {self.overlap}")
        if not 0 <= self.min_tissue <= 1:
            raise ConfigError(f"--min-tissue must be in [0, 1], got {self.min_tissue}")
        if self.max_side_px < 1 or not self.max_gigapixels > 0:
            raise ConfigError(f"--max-side-px and --max-gigapixels must be > 0 ({self.max_side_px}, "
                              f"{self.max_gigapixels})")
        if self.batch_size < 1 or self.workers < 0:
            raise ConfigError(f"--batch-size must be >= 1 and --workers >= 0 ({self.batch_size}, {self.workers})")
        if self.precision is not None and self.precision not in ("bf16", "fp16", "fp32"):
            raise ConfigError(f"--precision must be bf16, fp16 or fp32, got {self.precision!r}")
        if self.features_dtype not in ("float16", "float32"):
            raise ConfigError(f"--features-dtype must be float16 or float32, got {self.features_dtype!r}")
        if self.read_path not in READ_PATHS:
            raise ConfigError(f"--read-path must be one of {', '.join(READ_PATHS)}, got {self.read_path!r}")
        if self.jpeg_decode not in JPEG_DECODES:
            raise ConfigError(f"--jpeg-decode must be one of {', '.join(JPEG_DECODES)}, got {self.jpeg_decode!r}")
        self.encoder_kwargs_dict  # noqa: B018 - raises ConfigError when malformed
        for name in ("mean", "std"):
            v = getattr(self, name)
            if v is not None and (len(v) != 3 or (name == "std" and min(float(x) for x in v) <= 0)):
                raise ConfigError(f"--{name} {v}: expected three numbers R G B (0..1 scale)")
        if self.input_size is not None and int(self.input_size) < 0:
            raise ConfigError(f"--input-size must be >= 0 (0: no resize), got {self.input_size}")
        bad = self.stage_set - set(STAGES)
        if bad or not self.stage_set:
            raise ConfigError(f"--stages {self.stages!r}: choose from {','.join(STAGES)}")
        i, n = self.shard_index
        if not (n >= 1 and 0 <= i < n):
            raise ConfigError(f"--shard {self.shard!r}: need 0 <= i < n")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


FIELD_NAMES = {f.name for f in fields(PreprocessConfig)}


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Keys of a YAML config (dashes or underscores), checked against the known settings."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"--config {path}: cannot read: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of settings")
    out = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(out) - FIELD_NAMES)
    if unknown:
        raise ConfigError(f"--config {path}: unknown keys {unknown}; known: {sorted(FIELD_NAMES)}")
    return out
