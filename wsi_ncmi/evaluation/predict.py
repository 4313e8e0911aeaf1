"""Predict with a trained (frozen) aggregator on new bags, with an out-of-distribution flag per slide.

The library side of ``wsi-ncmi predict``: choose the bags (:func:`select_bags`), check them against what the
checkpoint was trained on (:func:`check_bags`, :mod:`wsi_ncmi.data.provenance`), embed them and score them
(:func:`predict_bags`), write ``predictions.csv`` / ``summary.md`` / ``predict.json`` (:func:`write_prediction`)
and attention heatmaps where the slide file is at hand (:func:`write_heatmaps`), then ``report.html``
(:mod:`.html_report`). :func:`predict_module` is the
whole verb for a loaded ``MILModule`` (the command and the demo load it with
``wsi_ncmi.training.checkpoint.load_mil_module``: evaluation may not import training).

``predictions.csv``: ``slide_id, [label,] prediction, prob_<class>…, ood_score, ood_flag, [kl_<class>…],
ood_<score>…``. ``prediction`` is the class name; the probabilities are those of the classifier the report
measured (``--classifier``, default the report's primary protocol: LP for NCMI runs, the head for CE runs), read
from the evaluation folder (:mod:`.classifier_io`) and temperature-scaled on validation (:mod:`.calibration`).
Without an evaluation folder: the run's own class scores (softmax of the head, or softmax(−KL(p ‖ ξ))),
uncalibrated, and a warning.
``ood_score`` is the run's OOD score (:mod:`wsi_ncmi.evaluation.ood`; the calibration's default unless
another is asked for), ``ood_flag`` is ``ood_score > threshold`` (empty without a calibration), ``kl_<class>``
(NCMI runs) is KL(p ‖ centroid of that class) for the centroids of the OOD score (so ``ood_score`` = the
smallest ``kl_``), and ``ood_<score>`` columns hold every score the run has.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from wsi_ncmi.data.bags import BagError, check_header, list_bags, read_features
from wsi_ncmi.data.provenance import CHECKPOINT_KEY, ProvenanceError, bag_mismatches, bag_provenance
from wsi_ncmi.errors import UserError
from wsi_ncmi.models import MILAggregator
from wsi_ncmi.ncmi import NCMILoss

from .classifier_io import SavedClassifier, classify, load_evaluation
from .embed import embed_split
from .ood import (
    Calibration,
    OODError,
    ScoreInputs,
    compute_scores,
    find_calibration,
    score_inputs,
    sha256_of,
)
from .predict_output import write_prediction

__all__ = [
    "PredictError",
    "Prediction",
    "check_bag_files",
    "check_bags",
    "predict_bags",
    "predict_module",
    "read_slide_list",
    "select_bags",
    "slide_file",
    "write_heatmaps",
    "write_prediction",
]

logger = logging.getLogger(__name__)

class PredictError(UserError):
    """Prediction cannot run (no bags, unknown slide, bad slide list, …); the message names the file."""


# ------------------------------------------------------------------------------------------ inputs
def read_slide_list(csv: str | os.PathLike, base_dir: str | os.PathLike | None = None) -> pd.DataFrame:
    """A ``--slides`` CSV: a ``slide_id`` column (or a ``path`` column, resolved under ``base_dir`` when
    relative; the slide id is the file name without its last extension) and an optional ``label`` column.
    Returns ``slide_id[, path][, label]`` as strings."""
    p = Path(csv)
    if not p.is_file():
        raise PredictError(f"--slides {p}: no such file")
    try:
        df = pd.read_csv(p, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise PredictError(f"--slides {p}: not a readable CSV: {exc}") from exc
    if "slide_id" not in df.columns and "path" not in df.columns:
        raise PredictError(f"--slides {p}: needs a 'slide_id' or 'path' column, has {list(df.columns)}")
    if "path" in df.columns:
        base = Path(base_dir) if base_dir is not None else p.parent
        df["path"] = [str(x if Path(x).is_absolute() else base / x) for x in df["path"]]
        if "slide_id" not in df.columns:
            df["slide_id"] = [Path(x).stem for x in df["path"]]  # as wsi-preprocess names slides
    df["slide_id"] = df["slide_id"].str.strip()
    if (df["slide_id"] == "").any():
        raise PredictError(f"--slides {p}: empty slide_id in row(s) {list(np.flatnonzero(df['slide_id'] == '') + 2)}")
    dup = sorted(df.loc[df["slide_id"].duplicated(), "slide_id"].unique())
    if dup:
        raise PredictError(f"--slides {p}: duplicated slide_id {dup[:5]}")
    return df[[c for c in ("slide_id", "path", "label") if c in df.columns]].reset_index(drop=True)


def select_bags(bags_dir: str | os.PathLike, slides: pd.DataFrame | None = None) -> dict[str, Path]:
    """``{slide_id: bag path}``: every bag in ``bags_dir``, or the listed ones (all must exist). A wanted
    ``<slide_id>.h5`` that is not a file (a folder, a broken link) is refused, not skipped: no slide is left out
    of the predictions silently."""
    bags = list_bags(bags_dir)  # BagError names the folder when it does not exist
    wanted = None if slides is None else set(slides["slide_id"])
    odd = [p for p in sorted(Path(bags_dir).glob("*.h5"))
           if not p.is_file() and (wanted is None or p.name[: -len(".h5")] in wanted)]
    if odd:
        kind = "a folder" if odd[0].is_dir() else "not a readable file"
        raise PredictError(f"{odd[0]}: is {kind}, not a bag file"
                           + (f" (and {len(odd) - 1} more: {', '.join(p.name for p in odd[1:4])})" if len(odd) > 1
                              else "") + "; move it away (or list the other slides with --slides) and run again")
    if slides is not None:
        missing = [s for s in slides["slide_id"] if s not in bags]
        if missing:
            raise PredictError(f"{bags_dir}: no bag for {len(missing)} listed slide(s): {missing[:5]}")
        bags = {s: bags[s] for s in slides["slide_id"]}
    if not bags:
        raise PredictError(f"{bags_dir}: no *.h5 bag to predict on")
    return bags


def check_bags(bags: Mapping[str, Path], checkpoint: Mapping[str, Any], ckpt_name: str,
               allow_mismatch: bool = False) -> dict[str, list[str]]:
    """Compare every bag with the training bags recorded in ``checkpoint`` (its dict) before anything runs.

    Returns ``{slide_id: [mismatch, …]}`` (only the mismatching slides; with ``allow_mismatch``), or raises
    :class:`ProvenanceError` naming the first bad bags, both sides of each difference and the checkpoint.
    A checkpoint without a record (trained before it existed) is refused unless ``allow_mismatch``.
    """
    recorded = checkpoint.get(CHECKPOINT_KEY)
    if not isinstance(recorded, Mapping):
        msg = (f"{ckpt_name}: the checkpoint records no training-bag provenance (trained before `wsi-ncmi "
               "predict` existed, or without a datamodule), so the bags cannot be checked against it")
        if not allow_mismatch:
            raise ProvenanceError(msg + "; pass --allow-mismatch to predict anyway")
        logger.warning("%s (--allow-mismatch)", msg)
        return {sid: ["checkpoint records no provenance"] for sid in bags}
    bad: dict[str, list[str]] = {}
    for sid, path in bags.items():
        why = bag_mismatches(bag_provenance(path), recorded)
        if why:
            bad[sid] = why
    if bad and not allow_mismatch:
        shown = "; ".join(f"{bags[s]}: {', '.join(w)}" for s, w in list(bad.items())[:3])
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise ProvenanceError(f"{len(bad)} bag(s) do not match what {ckpt_name} was trained on: {shown}{more}. "
                              "Re-extract them with the training settings (`--slides-dir`), or pass "
                              "--allow-mismatch to predict anyway (recorded in the output)")
    for sid, why in bad.items():
        logger.warning("%s: %s (--allow-mismatch)", bags[sid], "; ".join(why))
    return bad


def check_bag_files(bags: Mapping[str, Path], in_dim: int) -> None:
    """Every bag can be run by a model taking ``in_dim`` features: :func:`~wsi_ncmi.data.bags.check_header`
    (at least one row, float features, coords rows = feature rows, not renamed) and D = ``in_dim``. Checked
    before anything runs, also under ``--allow-mismatch`` (which allows other preprocessing, not broken bags)."""
    for path in bags.values():
        _, d, _ = check_header(path)
        if d != in_dim:
            raise BagError(f"{path}: features have D={d} but the checkpoint's model takes D={in_dim}; a bag made "
                           "with another encoder cannot be predicted, even with --allow-mismatch")


# --------------------------------------------------------------------------------------- predicting
def _batches(bags: Mapping[str, Path]) -> Iterator[dict[str, Any]]:
    for sid, path in bags.items():
        x = torch.from_numpy(read_features(path))[None]  # [1, N, D] stored dtype
        yield {"features": x, "mask": None, "label": torch.tensor([-1]), "slide_id": [sid]}


@dataclass
class Prediction:
    """Per-slide predictions and OOD scores (``table`` is ``predictions.csv``)."""

    table: pd.DataFrame
    class_names: list[str]
    score_name: str
    threshold: float | None
    scores: dict[str, np.ndarray] = field(default_factory=dict)  # every available score [N]
    metrics: dict[str, Any] | None = None  # classification metrics when labels were given
    classifier: str = ""  # lp | cc | xi | head
    temperature: float = 1.0


def _labels(values: Sequence[str], class_names: Sequence[str], where: str) -> np.ndarray:
    names = [str(c) for c in class_names]
    out = []
    for v in values:
        v = str(v).strip()
        if v in names:
            out.append(names.index(v))
        elif v.lstrip("-").isdigit() and 0 <= int(v) < len(names):
            out.append(int(v))
        else:
            raise PredictError(f"{where}: label {v!r} is neither a class name {names} nor 0..{len(names) - 1}")
    return np.asarray(out, dtype=np.int64)


def predict_bags(
    model: MILAggregator,
    bags: Mapping[str, Path],
    class_names: Sequence[str],
    ncmi_loss: NCMILoss | None = None,
    calibration: Calibration | None = None,
    score: str | None = None,
    labels: Sequence[str] | None = None,
    device: str | torch.device = "cpu",
    labels_source: str = "--slides",
    classifier: SavedClassifier | None = None,
    which: str | None = None,
) -> Prediction:
    """Embed ``bags`` with the frozen ``model`` and predict (module docstring). ``score`` overrides the
    calibration's default OOD score (without a calibration: ``ncmi_xi`` for NCMI runs, ``msp`` otherwise).
    ``classifier`` / ``which``: the saved classifier of `wsi-ncmi evaluate` and which of its classifiers to use
    (:func:`.classifier_io.classify`)."""
    names = [str(c) for c in class_names]
    emb = embed_split(model, _batches(bags), device=device, ncmi_loss=ncmi_loss)
    means = calibration.class_means_array() if calibration is not None else None
    if means is not None and ncmi_loss is None:
        raise OODError("the calibration holds NCMI class means but the checkpoint is not an NCMI run: "
                       "was it made from another checkpoint?")
    inputs = score_inputs(logits=emb.logits, log_probs=emb.log_probs, ncmi_loss=ncmi_loss, class_means=means,
                          embeddings=emb.embeddings, input_means=emb.input_means,
                          train_mean=calibration.train_mean_array() if calibration is not None else None,
                          input_stats=calibration.input_stats() if calibration is not None else None)
    if inputs.logits is None or inputs.logits.shape[1] != len(names):
        raise PredictError(f"the model gives {None if inputs.logits is None else inputs.logits.shape[1]} class "
                           f"scores but {len(names)} class names are known ({names})")
    scores = compute_scores(inputs)
    name = score or (calibration.default_score if calibration is not None else
                     ("ncmi_xi" if ncmi_loss is not None else "msp"))
    if name not in scores:
        raise OODError(f"OOD score {name!r} is not available for this run (available: {sorted(scores)})")
    threshold = None
    if calibration is not None:
        if name not in calibration.thresholds:
            raise OODError(f"the calibration has no threshold for {name!r} (has {sorted(calibration.thresholds)})")
        threshold = float(calibration.thresholds[name])
    proba, used, temperature = classify(emb, classifier, which, ncmi_loss)  # [N, C] calibrated
    table = pd.DataFrame({"slide_id": emb.slide_ids})
    y = None
    if labels is not None:
        y = _labels(labels, names, labels_source)
        table["label"] = [names[i] for i in y]
    table["prediction"] = [names[i] for i in proba.argmax(axis=1)]
    for c, n in enumerate(names):
        table[f"prob_{n}"] = proba[:, c]
    table["ood_score"] = scores[name]
    table["ood_flag"] = pd.array([bool(s > threshold) for s in scores[name]] if threshold is not None
                                 else [pd.NA] * len(table), dtype="boolean")
    kl = _kl_table(inputs, name)
    if kl is not None:
        for c, n in enumerate(names):
            table[f"kl_{n}"] = kl[:, c]
    for other, s in scores.items():
        table[f"ood_{other}"] = s
    metrics = None
    if y is not None:
        from wsi_ncmi.metrics import classification_metrics

        metrics = classification_metrics(y, proba, len(names))
    return Prediction(table, names, name, threshold, scores, metrics, used, temperature)


def _kl_table(inputs: ScoreInputs, score: str) -> np.ndarray | None:
    if inputs.kl_xi is None:
        return None
    return inputs.kl_means if score == "ncmi_means" and inputs.kl_means is not None else inputs.kl_xi


# ----------------------------------------------------------------------------------------- heatmaps
def slide_file(bag_path: Path, slide_paths: Mapping[str, Path] | None = None) -> Path | None:
    """The slide a bag was made from: ``slide_paths[<slide_id>]`` (the slides preprocessing finds in
    ``--slides-dir``: files and DICOM WSI folders, listed by the command) or the bag's recorded ``source_path``
    when that file or folder still exists; None otherwise."""
    from wsi_ncmi.data.bags import inspect_bag

    info = inspect_bag(bag_path)
    sid = str(info["slide_id"])
    if slide_paths and sid in slide_paths:
        return Path(slide_paths[sid])
    src = info["attrs"].get("source_path")
    return Path(src) if src and Path(src).exists() else None


# open_slide(path, mpp) -> a context-managed preprocessing.readers slide reader (the command passes
# preprocessing.readers.open_slide: this layer does not import preprocessing)
SlideOpener = Callable[[Path, float | None], Any]


def _thumbnail(open_slide: SlideOpener, slide: Path, bag: Path, max_side: int) -> tuple[np.ndarray, float]:
    from wsi_ncmi.data.bags import read_bag

    from .heatmap_slide import read_slide_thumbnail, recorded_mpp

    with open_slide(slide, recorded_mpp(read_bag(bag, lazy=True))) as reader:
        return read_slide_thumbnail(reader, max_side=max_side)


def write_heatmaps(model: MILAggregator, bags: Mapping[str, Path], out_dir: str | os.PathLike,
                   slide_paths: Mapping[str, Path] | None = None, device: str = "cpu",
                   max_side: int = 1024, open_slide: SlideOpener | None = None) -> dict[str, str]:
    """Attention heatmaps ``out_dir/<slide_id>.png`` for the slides whose file is available (see
    :func:`slide_file`). The thumbnail is read through ``open_slide`` when given (every format preprocessing
    reads), else with OpenSlide. Returns ``{slide_id: png path or why it was skipped}``."""
    from .heatmap import slide_heatmap

    done: dict[str, str] = {}
    for sid, bag in bags.items():
        slide = slide_file(bag, slide_paths)
        if slide is None:
            done[sid] = "skipped: slide file not found"
            continue
        png = Path(out_dir) / f"{sid}.png"
        try:
            thumb = _thumbnail(open_slide, slide, bag, max_side) if open_slide is not None else None
            slide_heatmap(model, bag, slide, png, max_side=max_side, device=device, thumbnail=thumb,
                          csv_path=png.with_suffix(".tiles.csv"), title=f"{sid}: attention rank")
        except (UserError, OSError) as exc:  # HeatmapError, BagError, a slide the reader refuses
            done[sid] = f"skipped: {exc}"
            logger.warning("heatmap of %s skipped: %s", sid, exc)
            continue
        done[sid] = str(png)
    return done


def embed_bags(model: MILAggregator, bags: Mapping[str, Path], ncmi_loss: NCMILoss | None = None,
               device: str | torch.device = "cpu") -> Any:
    """``EmbeddedSplit`` of unlabelled bags (labels -1), e.g. the OOD bags of ``wsi-ncmi evaluate --ood-bags``."""
    return embed_split(model, _batches(bags), device=device, ncmi_loss=ncmi_loss)


# ------------------------------------------------------------------------------------------ the verb
def predict_module(module: Any, checkpoint: Mapping[str, Any], ckpt: str | os.PathLike, bags: Mapping[str, Path],
                   out_dir: str | os.PathLike, *, bags_dir: str | os.PathLike, slides: pd.DataFrame | None = None,
                   slides_csv: str | None = None, calibration: str | os.PathLike | None = None,
                   ood_score: str | None = None, allow_mismatch: bool = False, heatmaps: bool = False,
                   eval_dir: str | os.PathLike | None = None, classifier: str | None = None,
                   slide_paths: Mapping[str, Path] | None = None, open_slide: SlideOpener | None = None,
                   device: str = "cpu", preprocessed: Mapping[str, Any] | None = None,
                   echo: Callable[[str], None] | None = None) -> Prediction:
    """Predict ``bags`` with the loaded ``module`` (a ``MILModule``) of checkpoint ``ckpt`` (read as
    ``checkpoint``) and write ``predictions.csv``, ``summary.md``, ``predict.json`` (and ``heatmaps/``) into
    ``out_dir``.

    The bags are checked against the checkpoint's training bags first (:func:`check_bags`; ``allow_mismatch``
    records the differences instead). ``eval_dir`` (default: the folder `wsi-ncmi evaluate` recorded in the run
    folder) holds the classifier (``classifier``: lp | cc | xi | head, default the report's primary) and
    ``calibration.json``. ``calibration``: another ``calibration.json``; both are refused when made from another
    checkpoint, unless ``allow_mismatch``; without one: one made from ``ckpt`` under its run folder, else no OOD
    flag and a warning. ``slides`` (from ``slides_csv``): the slide list, its ``label`` column scores the
    predictions. ``heatmaps`` draws the slides found by :func:`slide_file` in ``slide_paths`` (``{slide_id:
    path}``), opened with ``open_slide``. Lines meant for the user go to ``echo``.
    """
    say = echo or (lambda _line: None)
    ckpt, out = Path(ckpt), Path(out_dir)
    mismatches = check_bags(bags, checkpoint, str(ckpt), allow_mismatch=allow_mismatch)
    check_bag_files(bags, module.model.in_dim)
    recorded = checkpoint.get(CHECKPOINT_KEY)
    class_names = list((recorded or {}).get("class_names") or []) or [str(i) for i in range(module.num_classes)]
    digest = sha256_of(ckpt)
    saved, found = load_evaluation(ckpt, digest, int(module.model.embed_dim), len(class_names), class_names,
                                   module.ncmi_loss, eval_dir, allow_mismatch)
    cal_path = Path(calibration) if calibration else (found.calibration or find_calibration(ckpt))
    cal = Calibration.read(cal_path) if cal_path else None
    if cal is None:
        logger.warning("no calibration.json for %s: OOD scores are written without a flag "
                       "(run `wsi-ncmi evaluate` on the checkpoint, or pass --eval DIR)", ckpt)
    elif cal.checkpoint_sha256:
        if cal.checkpoint_sha256 != digest:
            msg = f"--calibration {cal_path} was made from another checkpoint ({cal.checkpoint}), not {ckpt}"
            if not allow_mismatch:
                raise OODError(msg + "; its thresholds do not apply (--allow-mismatch to use it anyway)")
            logger.warning("%s (--allow-mismatch)", msg)
            mismatches = {**mismatches, "(calibration)": [msg]}

    labels = None
    if slides is not None and "label" in slides.columns:
        lab = slides.set_index("slide_id")["label"]
        labels = [lab[s] for s in bags]
    pred = predict_bags(module.model, bags, class_names, ncmi_loss=module.ncmi_loss, calibration=cal,
                        score=ood_score, labels=labels, device=device, labels_source=str(slides_csv),
                        classifier=saved, which=classifier)
    meta: dict[str, Any] = {"checkpoint": str(ckpt), "bags_dir": str(bags_dir), "calibration": str(cal_path or ""),
                            "allow_mismatch": bool(allow_mismatch), "mismatches": mismatches,
                            "objective": module.objective, "preprocessed": preprocessed,
                            "classifier": pred.classifier, "temperature": pred.temperature,
                            "classifier_dir": saved.source if saved is not None else "",
                            "checkpoint_sha256": digest,
                            "training_bags": dict(recorded.get("values") or {}) if isinstance(recorded, Mapping) else None}
    if cal is not None and cal.target_false_alarm is not None:
        meta["ood_rule"] = f"{cal.rule} quantile, target false-alarm rate {cal.target_false_alarm:g}"
    if heatmaps:
        meta["heatmaps"] = write_heatmaps(module.model, bags, out / "heatmaps", slide_paths=slide_paths,
                                          device=device, open_slide=open_slide)
    paths = write_prediction(out, pred, meta)
    flags = pred.table["ood_flag"]
    n_flag = "no calibration" if pred.threshold is None else f"{int(flags.fillna(False).astype(bool).sum())} flagged OOD"
    say(f"{len(pred.table)} slides predicted ({n_flag}; score {pred.score_name}) → {paths['predictions']}")
    say(paths["summary"].read_text(encoding="utf-8"))
    from .html_report import write_html_report

    say(f"report page → {write_html_report(out)}")
    return pred
