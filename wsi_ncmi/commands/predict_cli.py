"""`wsi-ncmi predict`: a trained checkpoint on new (unlabelled) slides, with an out-of-distribution flag.

    wsi-ncmi predict --ckpt runs/abmil_ncmi/checkpoints/best.ckpt --bags new_bags/ --out pred/
    wsi-ncmi predict --ckpt CKPT --slides-dir new_slides/ --weights uni.bin --out pred/ --heatmaps

``--bags``: every bag of the folder (or those of ``--slides``), each checked against what the checkpoint was
trained on before anything runs. ``--slides-dir``: ``wsi-preprocess`` with the checkpoint's recorded
settings into ``OUT/features/`` (resumable: finished slides are skipped; the slides its discovery finds: files of
every format it reads, OME-TIFF, CZI, DICOM WSI folders), then the same; heatmaps open them with its readers. Writes
``OUT/predictions.csv``, ``OUT/summary.md``, ``OUT/predict.json`` (and ``OUT/heatmaps/`` with ``--heatmaps``);
see :mod:`wsi_ncmi.evaluation.predict` and :mod:`wsi_ncmi.evaluation.ood`. The classifier (``--classifier``,
default the report's primary, temperature-scaled) and the OOD calibration come from the `wsi-ncmi evaluate`
folder of the checkpoint (recorded in its run folder, or ``--eval DIR``; :mod:`wsi_ncmi.evaluation.classifier_io`).

Exit codes: 0 done; 2 a user error (message on stderr); 3 preprocessing left some slides failed (the others
are predicted; see ``OUT/features/manifest.csv``). Every bag is checked before anything runs (exit 2 naming it): a
``<slide_id>.h5`` entry that is a folder, an empty bag, another feature dim, coords rows other than feature rows
or a renamed bag are refused, also under ``--allow-mismatch``; no slide is left out of the predictions silently.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from wsi_ncmi.errors import UserError

__all__ = ["build_parser", "main"]

logger = logging.getLogger(__name__)


def _echo(text: str, err: bool = False) -> None:
    (sys.stderr if err else sys.stdout).write(text + "\n")


def build_parser() -> argparse.ArgumentParser:
    from wsi_ncmi.evaluation.classifier_io import CLASSIFIERS
    from wsi_ncmi.evaluation.ood import OOD_SCORERS

    p = argparse.ArgumentParser(prog="wsi-ncmi predict", description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="MILModule checkpoint (best.ckpt / last.ckpt)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--bags", help="folder of <slide_id>.h5 bags")
    src.add_argument("--slides-dir", help="folder of slides, preprocessed with the checkpoint's settings first")
    p.add_argument("--weights", help="encoder weight file (with --slides-dir; must be the one the training bags "
                                     "were made with)")
    p.add_argument("--slides", help="CSV with slide_id (or path) [+ label]: only these slides")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--heatmaps", action="store_true", help="attention heatmaps of the slides whose file is found")
    p.add_argument("--calibration", help="calibration.json of `wsi-ncmi evaluate` (default: one made from this "
                                         "checkpoint under its run folder, else none and a warning)")
    p.add_argument("--ood-score", choices=sorted(OOD_SCORERS), help="OOD score (default: the calibration's)")
    p.add_argument("--eval", dest="eval_dir", help="the `wsi-ncmi evaluate --out` folder of this checkpoint (default: "
                                                   "the one evaluate recorded in the run folder)")
    p.add_argument("--classifier", choices=list(CLASSIFIERS),
                   help="lp | cc | xi | head (default: the report's primary protocol, temperature-scaled)")
    p.add_argument("--allow-mismatch", action="store_true",
                   help="predict on bags that differ from the training bags (recorded in the output)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (aggregator and encoder)")
    p.add_argument("--workers", type=int, default=0, help="slide reader processes of the preprocessing")
    p.add_argument("--batch-size", type=int, default=64, help="encoder batch size of the preprocessing")
    return p


def _preprocess(args: argparse.Namespace, recorded: dict[str, Any] | None, out: Path) -> tuple[Path, dict, int]:
    """Run ``wsi-preprocess`` with the recorded settings; returns (bags folder, run info, exit code)."""
    from preprocessing.extract import run
    from preprocessing.replay import check_weights, config_from_settings
    from wsi_ncmi.data.provenance import ProvenanceError

    settings = (recorded or {}).get("settings")
    if not settings:
        raise ProvenanceError(f"--ckpt {args.ckpt}: the checkpoint records no preprocessing settings (its bags were "
                              "not made by wsi-preprocess, or with mixed settings); preprocess the slides yourself "
                              "and use --bags")
    if not args.weights:
        raise ProvenanceError("--slides-dir needs --weights (the encoder weight file of the training bags)")
    if not args.allow_mismatch:
        check_weights(args.weights, settings.get("weights_sha256"))
    cfg = config_from_settings(settings, input=args.slides_dir, output=str(out / "features"), weights=args.weights,
                               device=args.device, workers=args.workers, batch_size=args.batch_size,
                               slides=args.slides, progress=False)
    result = run(cfg)
    failed = result.failed()
    if failed:
        _echo(f"wsi-ncmi predict: {len(failed)} slide(s) failed preprocessing ({', '.join(failed[:5])}); "
              f"see {out / 'features' / 'manifest.csv'}", err=True)
    info = {"slides_dir": str(args.slides_dir), "features": str(out / "features"),
            "statuses": dict(result.statuses)}
    return out / "features" / "bags", info, 3 if failed else 0


def slide_paths(slides_dir: str | Path, exclude: Path) -> dict[str, Path]:
    """``{slide_id: path}`` of the slides under ``slides_dir`` as ``wsi-preprocess`` finds them
    (``preprocessing.discovery.find_slides``: every reader's extension, OME-TIFF, CZI, DICOM WSI folders),
    not searching ``exclude`` (the output folder)."""
    from preprocessing.discovery import find_slides
    from preprocessing.readers import slide_id_of

    return {slide_id_of(p): p for p in find_slides(slides_dir, exclude=[exclude])}


def _predict(args: argparse.Namespace) -> int:
    from wsi_ncmi.data.bags import list_bags
    from wsi_ncmi.data.outputs import check_output_dir
    from wsi_ncmi.data.provenance import CHECKPOINT_KEY
    from wsi_ncmi.evaluation.predict import PredictError, predict_module, read_slide_list, select_bags
    from wsi_ncmi.training.checkpoint import load_mil_module, read_checkpoint

    ckpt, out = Path(args.ckpt), check_output_dir(args.out, "--out")
    if ckpt.is_dir():
        raise PredictError(f"--ckpt {ckpt}: is a folder; give the checkpoint file (e.g. {ckpt / 'best.ckpt'})")
    if not ckpt.is_file():
        raise PredictError(f"--ckpt {ckpt}: no such file")
    if args.weights and not args.slides_dir:
        raise PredictError("--weights is only used with --slides-dir")
    state = read_checkpoint(ckpt)  # weights_only; a malicious / truncated / foreign file is one CheckpointError line
    recorded = state.get(CHECKPOINT_KEY)
    base = args.slides_dir if args.slides_dir else args.bags
    slides = read_slide_list(args.slides, base) if args.slides else None
    rc, pre = 0, None
    if args.slides_dir:
        if not Path(args.slides_dir).is_dir():
            raise PredictError(f"--slides-dir {args.slides_dir}: no such folder")
        bags_dir, pre, rc = _preprocess(args, recorded, out)
        done = list_bags(bags_dir) if bags_dir.is_dir() else {}
        wanted = list(slides["slide_id"]) if slides is not None else [s for s, st in pre["statuses"].items()
                                                                     if st in ("ok", "skipped")]
        bags = {s: done[s] for s in wanted if s in done}
        if not bags:
            raise PredictError(f"--slides-dir {args.slides_dir}: no slide gave a bag (see {bags_dir.parent}/manifest.csv)")
    else:
        bags_dir = Path(args.bags)
        bags = select_bags(bags_dir, slides)
    from preprocessing.readers import open_slide

    found = slide_paths(args.slides_dir, out) if args.slides_dir and args.heatmaps else None
    module, _ = load_mil_module(ckpt, args.device)
    predict_module(module, state, ckpt, bags, out, bags_dir=bags_dir, slides=slides, slides_csv=args.slides,
                   calibration=args.calibration, ood_score=args.ood_score, allow_mismatch=args.allow_mismatch,
                   heatmaps=args.heatmaps, slide_paths=found, open_slide=open_slide, device=args.device,
                   preprocessed=pre,
                   eval_dir=args.eval_dir, classifier=args.classifier,
                   echo=_echo)
    return rc


def main(argv: list[str] | None = None) -> int:
    """`wsi-ncmi predict ...`; 0 on success, 2 on a user error, 3 when some slides failed preprocessing."""
    args = build_parser().parse_args(argv)
    try:
        return _predict(args)
    except UserError as err:
        from wsi_ncmi.commands.errors import one_line

        _echo(f"wsi-ncmi predict: error: {one_line(err)}", err=True)
        return 2
    except OSError as err:  # disk full, read-only, ... while writing --out
        from wsi_ncmi.commands.errors import write_failure

        line = write_failure(err, f"--out {args.out}")
        if line is None:
            raise
        _echo(f"wsi-ncmi predict: error: {line}", err=True)
        return 2
