"""Published pathology encoders as exact, offline presets: architecture, preprocessing, pooling, converters.

One concept split along its seams: :mod:`.recipe` (what a preset is: :class:`Preset`, the registry, JSON
kwargs), :mod:`.towers` (the modules a preset builds: token pooling, CONCH towers, ``BUILDERS``),
:mod:`.converters` (published key names → built model, ``CONVERTERS``) and :mod:`.table` (the rows, each
naming the public source and commit it was checked against). Everything is re-exported here, so
``from preprocessing.presets import PRESETS, CONVERTERS, pool_model`` keeps working.

* ``builder``: ``"timm"`` (``timm.create_model(arch, num_classes=0, **kwargs)``), ``"conch_v15"`` or
  ``"conch_v1"`` (a timm ViT trunk + CONCH's attentional pooler).
* ``pooling``: ``cls``, ``mean`` (patch tokens only), ``cls_mean`` (both, concatenated) or ``model``.
* preprocessing: ``resize`` (side resized to first; ``None``: straight to ``input_size``), then a center crop to
  ``input_size``; ``interpolation`` ``bilinear``/``bicubic`` (antialiased); ``mean``/``std`` on the 0..1 scale.
* ``converter``: a name in :data:`CONVERTERS`, applied to every ``--weights`` file before the strict check.

Weights are never bundled or downloaded; ``license`` repeats the licence the authors state publicly, and
``note`` says which recipe fields the named sources leave open.
"""

from __future__ import annotations

from . import table  # noqa: F401  (registers the rows)
from .converters import CONVERTERS, Converter, register_converter
from .recipe import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    INTERPOLATIONS,
    POOLINGS,
    PRESETS,
    Preset,
    kwargs_to_json,
    preset_rows,
    register_preset,
    resolve_kwargs,
)
from .towers import (
    BUILDERS,
    AttentionalPooler,
    ConchV1Tower,
    ConchV15Tower,
    MultiheadAttentionPooler,
    TokenPool,
    pool_model,
)

__all__ = [
    "Preset", "PRESETS", "register_preset", "CONVERTERS", "Converter", "register_converter", "BUILDERS",
    "POOLINGS", "INTERPOLATIONS", "IMAGENET_MEAN", "IMAGENET_STD", "resolve_kwargs", "kwargs_to_json",
    "TokenPool", "pool_model", "AttentionalPooler", "ConchV15Tower", "MultiheadAttentionPooler", "ConchV1Tower",
    "preset_rows",
]
