"""`wsi-ncmi natural fit|validate|test|evaluate` (the natural-image track).

* ``fit|validate|test``: LightningCLI over :class:`ImageModule` + :class:`ImageDataModule`;
  ``model.num_classes`` is linked from the datamodule, so configs never repeat it. A config file may
  build on others with a top-level ``__base__: [file, ...]`` key (the project's composition,
  :mod:`wsi_ncmi.training.compose`, shared with the MIL configs); ``-c a.yaml -c b.yaml`` also works.
* ``evaluate --ckpt CKPT [--data.* ...] [--out result.json]``: rebuild the datamodule from the
  checkpoint (``--data.*`` overrides, e.g. a moved ``--data.root``), then head / CC / LP top-1/top-5 and
  the test split's CMI/Γ/NCMI, streamed (:func:`~wsi_ncmi.natural.run.evaluate_checkpoint`;
  host memory N_train·D·4 bytes for LP, half with ``--lp-dtype float16``); writes a JSON.

``wsi-ncmi ncmi-metric`` (paper Figure 2) is :mod:`wsi_ncmi.commands.ncmi_metric_cli`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from wsi_ncmi.errors import UserError

__all__ = ["main"]

logger = logging.getLogger(__name__)

_FIT_SUBCOMMANDS = ("fit", "validate", "test", "predict")

def main(argv: list[str] | None = None) -> int:
    """``wsi-ncmi natural <fit|validate|test|evaluate> ...``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "evaluate":
        return _evaluate(argv[1:])
    if not argv or argv[0] in {"-h", "--help"}:
        print(
            "usage: wsi-ncmi natural {fit,validate,test,evaluate} [options]\n\n"
            "  fit|validate|test  LightningCLI, e.g. fit -c configs/natural/cifar100_resnet18_ncmi.yaml "
            "--data.root DIR\n"
            "  evaluate           --ckpt CKPT [--data.root DIR] [--out result.json]: head / CC / LP metrics"
        )
        return 0
    if argv[0] not in _FIT_SUBCOMMANDS:
        print(f"wsi-ncmi natural: unknown sub-command {argv[0]!r} (fit, validate, test, evaluate)", file=sys.stderr)
        return 2
    from wsi_ncmi.training.compose import ConfigComposeError, expand_config_args

    try:
        args = expand_config_args(argv)
    except ConfigComposeError as err:
        print(f"wsi-ncmi natural: {err}", file=sys.stderr)
        return 2
    from wsi_ncmi.natural.cli import NaturalCLI

    from .errors import one_line

    try:
        NaturalCLI(args)
    except UserError as err:  # a bad checkpoint, weight file, data file or setting
        print(f"wsi-ncmi natural {argv[0]}: error: {one_line(err)}", file=sys.stderr)
        return 2
    return 0


# ---------------------------------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------------------------------


def _eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="wsi-ncmi natural evaluate",
        description="Head / CC / LP top-1 and top-5 of a trained ImageModule checkpoint; writes a JSON.",
    )
    p.add_argument("--ckpt", required=True, help="Lightning checkpoint of `wsi-ncmi natural fit`")
    p.add_argument("--out", default=None, help="output JSON (default: <ckpt>.eval.json)")
    p.add_argument("--protocols", nargs="+", default=["head", "cc", "lp"], choices=["head", "cc", "lp"])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--lp-epochs", type=int, default=100, help="linear-probe epochs")
    p.add_argument("--lp-lr", type=float, default=1.0, help="linear-probe SGD lr (features are unit norm)")
    p.add_argument("--lp-batch-size", type=int, default=256)
    p.add_argument("--lp-dtype", default="float32", choices=["float32", "float16"],
                   help="dtype of the stored training LP features (float16 halves the host memory)")  # fmt: skip
    from wsi_ncmi.natural.run import DATA_OVERRIDES

    for name, typ in DATA_OVERRIDES.items():
        p.add_argument(f"--data.{name}", type=typ, default=None, help="override the checkpoint's data setting")
    return p


def _evaluate(argv: list[str]) -> int:
    import torch

    from wsi_ncmi.natural.evaluate import write_json
    from wsi_ncmi.natural.probe import LinearProbeConfig
    from wsi_ncmi.natural.run import DATA_OVERRIDES, evaluate_checkpoint

    args = _eval_parser().parse_args(argv)
    ckpt = Path(args.ckpt).expanduser()
    if not ckpt.is_file():
        print(f"wsi-ncmi natural evaluate: checkpoint not found: {ckpt}", file=sys.stderr)
        return 2
    try:
        result = evaluate_checkpoint(
            ckpt,
            data={name: getattr(args, f"data.{name}") for name in DATA_OVERRIDES},
            protocols=args.protocols,
            device=args.device,
            lp=LinearProbeConfig(epochs=args.lp_epochs, lr=args.lp_lr, batch_size=args.lp_batch_size),
            lp_dtype=getattr(torch, args.lp_dtype),
        )
    except UserError as err:
        print(f"wsi-ncmi natural evaluate: error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else ckpt.with_suffix(".eval.json")
    write_json(out, result)
    print(f"{'protocol':<8} {'top1':>7} {'top5':>7}")
    for name, acc in result["protocols"].items():
        print(f"{name:<8} {100 * acc['top1']:7.2f} {100 * acc['top5']:7.2f}")
    if "ncmi_metric" in result:
        m = result["ncmi_metric"]
        print(f"test CMI {m['cmi']:.4f}  Γ {m['gamma']:.4f}  NCMI {m['ncmi']:.4f}")
    print(f"wrote {out}")
    return 0
