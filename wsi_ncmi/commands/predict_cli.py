"""`wsi-ncmi predict`: a trained checkpoint on new (unlabelled) slides, with an out-of-distribution flag.

    wsi-ncmi predict --ckpt runs/abmil_ncmi/checkpoints/best.ckpt --bags new_bags/ --out pred/
    wsi-ncmi predict --ckpt CKPT --slides-dir new_slides/ --weights uni.bin --out pred/ --heatmaps

``--bags``: every bag of the folder (or those of ``--slides``), each checked against what the checkpoint was
trained on before anything runs. ``--slides-dir``: ``wsi-preprocess`` with the checkpoint's recorded
settings into ``OUT/features/`` (resumable: finished slides are skipped; the slides its discovery finds: files of
every format it reads, OME-TIFF, CZI, DICOM WSI folders), then the same; heatmaps open them with its readers. Writes
``OUT/predictions.csv``, ``OUT/summary.md``, ``OUT/predict.json`` (and ``OUT/heatmaps/`` with ``--heatmaps``);
see :mod:`wsi_ncmi.evaluation.predict_run` (the workflow), :mod:`wsi_ncmi.evaluation.predict` and
:mod:`wsi_ncmi.evaluation.ood`. The classifier (``--classifier``,
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


def _predict(args: argparse.Namespace) -> int:
    from functools import partial

    from preprocessing.discovery import slide_paths
    from preprocessing.readers import open_slide
    from preprocessing.replay import replay
    from wsi_ncmi.evaluation.predict_run import predict_checkpoint

    run = predict_checkpoint(
        args.ckpt, args.out, bags=args.bags, slides_dir=args.slides_dir, weights=args.weights, slides_csv=args.slides,
        build_bags=partial(replay, device=args.device, workers=args.workers, batch_size=args.batch_size,
                           progress=False),
        heatmaps=args.heatmaps, find_slides=slide_paths, open_slide=open_slide, calibration=args.calibration,
        ood_score=args.ood_score, eval_dir=args.eval_dir, classifier=args.classifier,
        allow_mismatch=args.allow_mismatch, device=args.device, echo=_echo, warn=partial(_echo, err=True))
    return 3 if run.failed else 0


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
