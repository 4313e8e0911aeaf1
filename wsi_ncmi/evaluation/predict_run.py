"""``predict_checkpoint``: the whole `wsi-ncmi predict` workflow for a checkpoint file, in one call.

Check the paths, read the checkpoint (``weights_only``), make the bags (``--bags``: the folder, or the slides of
``slides_csv``; ``--slides-dir``: preprocess the slides first with the checkpoint's recorded settings, by a bag
builder the caller passes in: evaluation does not import ``preprocessing``), load the module and predict
(:func:`~wsi_ncmi.evaluation.predict.predict_module`). Every problem is one
:class:`~wsi_ncmi.errors.UserError` line naming the flag and the file.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from wsi_ncmi.data.bags import list_bags
from wsi_ncmi.data.provenance import CHECKPOINT_KEY, ProvenanceError

from .predict import PredictError, Prediction, SlideOpener, predict_module, read_slide_list, select_bags

__all__ = ["BagBuilder", "BuiltBags", "PredictRun", "predict_checkpoint"]


class BuiltBags(Protocol):
    """What a bag builder returns (``preprocessing``'s ``RunResult``): the status of every slide."""

    statuses: dict[str, str]

    def failed(self) -> list[str]: ...


class BagBuilder(Protocol):
    """Preprocess the slides of ``input`` into ``output`` (bags in ``output/bags``) with the recorded ``settings``
    and the encoder weight file ``weights`` (checked against the recorded SHA-256 when ``check_sha``); ``slides``:
    a CSV of the slides to take (``preprocessing.replay.replay``)."""

    def __call__(self, settings: Mapping[str, Any], *, input: str, output: str, weights: str,
                 slides: str | None, check_sha: bool) -> BuiltBags: ...


@dataclass
class PredictRun:
    """The prediction, and the slides that failed preprocessing (the others were predicted)."""

    prediction: Prediction
    failed: list[str] = field(default_factory=list)


def _build(build_bags: BagBuilder, recorded: Any, ckpt: Path, slides_dir: Path, weights: str | None,
           out: Path, slides_csv: str | None, allow_mismatch: bool,
           say: Callable[[str], None]) -> tuple[Path, dict[str, Any], list[str]]:
    """Preprocess ``slides_dir`` into ``out/features``: (bags folder, run info for predict.json, failed slides)."""
    settings = (recorded or {}).get("settings")
    if not settings:
        raise ProvenanceError(f"--ckpt {ckpt}: the checkpoint records no preprocessing settings (its bags were "
                              "not made by wsi-preprocess, or with mixed settings); preprocess the slides yourself "
                              "and use --bags")
    if not weights:
        raise ProvenanceError("--slides-dir needs --weights (the encoder weight file of the training bags)")
    features = out / "features"
    result = build_bags(settings, input=str(slides_dir), output=str(features), weights=weights, slides=slides_csv,
                        check_sha=not allow_mismatch)
    failed = result.failed()
    if failed:
        say(f"wsi-ncmi predict: {len(failed)} slide(s) failed preprocessing ({', '.join(failed[:5])}); "
            f"see {features / 'manifest.csv'}")
    info = {"slides_dir": str(slides_dir), "features": str(features), "statuses": dict(result.statuses)}
    return features / "bags", info, failed


def predict_checkpoint(ckpt: str | os.PathLike, out: str | os.PathLike, *, bags: str | os.PathLike | None = None,
                       slides_dir: str | os.PathLike | None = None, build_bags: BagBuilder | None = None,
                       weights: str | None = None, slides_csv: str | None = None, heatmaps: bool = False,
                       find_slides: Callable[[Path, Path], Mapping[str, Path]] | None = None,
                       open_slide: SlideOpener | None = None, calibration: str | os.PathLike | None = None,
                       ood_score: str | None = None, eval_dir: str | os.PathLike | None = None,
                       classifier: str | None = None, allow_mismatch: bool = False, device: str = "cpu",
                       echo: Callable[[str], None] | None = None,
                       warn: Callable[[str], None] | None = None) -> PredictRun:
    """Predict the slides of ``bags`` (a bags folder) or ``slides_dir`` (slides, preprocessed by ``build_bags``
    into ``out/features`` first) with the ``wsi-ncmi fit`` checkpoint ``ckpt``, into ``out``.

    ``slides_csv``: only these slides (their ``label`` column scores the predictions). ``heatmaps``: attention
    heatmaps of the slides whose file is found (``find_slides(slides_dir, out)`` → ``{slide_id: path}`` with
    ``--slides-dir``, else the bag's recorded source), opened with ``open_slide``. The other options are
    :func:`~wsi_ncmi.evaluation.predict.predict_module`'s. Lines for the user go to ``echo``, warnings (slides
    that failed preprocessing) to ``warn``.
    """
    from wsi_ncmi.data.outputs import check_output_dir
    from wsi_ncmi.training.checkpoint import load_mil_module, read_checkpoint

    say = warn or (lambda _line: None)
    ckpt, out = Path(ckpt), check_output_dir(out, "--out")
    if ckpt.is_dir():
        raise PredictError(f"--ckpt {ckpt}: is a folder; give the checkpoint file (e.g. {ckpt / 'best.ckpt'})")
    if not ckpt.is_file():
        raise PredictError(f"--ckpt {ckpt}: no such file")
    if weights and not slides_dir:
        raise PredictError("--weights is only used with --slides-dir")
    state = read_checkpoint(ckpt)  # weights_only; a malicious / truncated / foreign file is one CheckpointError line
    slides = read_slide_list(slides_csv, slides_dir or bags) if slides_csv else None
    failed: list[str] = []
    pre = None
    if slides_dir:
        if not Path(slides_dir).is_dir():
            raise PredictError(f"--slides-dir {slides_dir}: no such folder")
        if build_bags is None:
            raise PredictError("--slides-dir: no bag builder given (predict_checkpoint(build_bags=...))")
        bags_dir, pre, failed = _build(build_bags, state.get(CHECKPOINT_KEY), ckpt, Path(slides_dir), weights, out,
                                       slides_csv, allow_mismatch, say)
        done = list_bags(bags_dir) if bags_dir.is_dir() else {}
        wanted = list(slides["slide_id"]) if slides is not None else [s for s, st in pre["statuses"].items()
                                                                     if st in ("ok", "skipped")]
        chosen = {s: done[s] for s in wanted if s in done}
        if not chosen:
            raise PredictError(f"--slides-dir {slides_dir}: no slide gave a bag (see {bags_dir.parent}/manifest.csv)")
    else:
        if bags is None:
            raise PredictError("give --bags or --slides-dir")
        bags_dir = Path(bags)
        chosen = select_bags(bags_dir, slides)
    found = find_slides(Path(slides_dir), out) if slides_dir and heatmaps and find_slides is not None else None
    module, _ = load_mil_module(ckpt, device)
    pred = predict_module(module, state, ckpt, chosen, out, bags_dir=bags_dir, slides=slides, slides_csv=slides_csv,
                          calibration=calibration, ood_score=ood_score, allow_mismatch=allow_mismatch,
                          heatmaps=heatmaps, slide_paths=found, open_slide=open_slide, device=device,
                          preprocessed=pre, eval_dir=eval_dir, classifier=classifier, echo=echo)
    return PredictRun(pred, failed)
