"""`wsi-ncmi natural fit|validate|test|evaluate` and `wsi-ncmi ncmi-metric` (the natural-image track).

* ``fit|validate|test``: LightningCLI over :class:`ImageModule` + :class:`ImageDataModule`;
  ``model.num_classes`` is linked from the datamodule, so configs never repeat it. A config file may
  build on others with a top-level ``__base__: [file, ...]`` key (the project's composition,
  :mod:`wsi_ncmi.training.compose`, shared with the MIL configs); ``-c a.yaml -c b.yaml`` also works.
* ``evaluate --ckpt CKPT [--data.* ...] [--out result.json]``: rebuild the datamodule from the
  checkpoint (``--data.*`` overrides, e.g. a moved ``--data.root``), then head / CC / LP top-1/top-5 and
  the test split's CMI/Γ/NCMI; writes a JSON.
* ``ncmi-metric --model resnet50 --weights FILE [FILE ...] --data IMAGEFOLDER``: paper Figure 2 —
  for each checkpoint, top-1 of its own head and the dataset-level NCMI of its softmax outputs; a
  markdown + CSV table, a scatter PNG and the Pearson r between NCMI and top-1.
"""

from __future__ import annotations

import argparse
import csv
import inspect
import io
import logging
import sys
import warnings
from pathlib import Path
from typing import Any

from wsi_ncmi.data.atomic import atomic_write_text

__all__ = ["main", "main_ncmi_metric", "NaturalCLI"]

logger = logging.getLogger(__name__)

_FIT_SUBCOMMANDS = ("fit", "validate", "test", "predict")
_DATA_OVERRIDES: dict[str, type] = {
    "dataset": str,
    "root": str,
    "batch_size": int,
    "num_workers": int,
    "image_size": int,
    "eval_size": int,
    "crop_pct": float,
    "limit_train": int,
    "limit_val": int,
}


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _make_cli_class() -> type:
    from lightning.pytorch.cli import LightningCLI

    class _NaturalCLI(LightningCLI):
        def add_arguments_to_parser(self, parser: Any) -> None:
            parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")

    return _NaturalCLI


def NaturalCLI(args: list[str], run: bool = True) -> Any:  # noqa: N802 - factory named like the class
    """Build (and by default run) the LightningCLI of the image track on ``args``."""
    from wsi_ncmi.data.images import ImageDataModule
    from wsi_ncmi.training.image_module import ImageModule

    cls = _make_cli_class()
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    return cls(
        ImageModule,
        ImageDataModule,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "wsi-ncmi natural"},
    )


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
    NaturalCLI(args)
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
    for name, typ in _DATA_OVERRIDES.items():
        p.add_argument(f"--data.{name}", type=typ, default=None, help="override the checkpoint's data setting")
    return p


def _load_checkpoint_hparams(path: Path) -> dict[str, Any]:
    import torch

    try:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise SystemExit(f"wsi-ncmi natural evaluate: cannot read checkpoint {path}: {err}") from err
    if "datamodule_hyper_parameters" not in ckpt:
        raise SystemExit(f"wsi-ncmi natural evaluate: {path} has no datamodule settings (not an image-track run?)")
    return dict(ckpt["datamodule_hyper_parameters"])


def _evaluate(argv: list[str]) -> int:
    from wsi_ncmi.data.images import ImageDataModule
    from wsi_ncmi.evaluation.image_eval import LinearProbeConfig, evaluate_image_model, write_json
    from wsi_ncmi.training.image_module import ImageModule

    args = _eval_parser().parse_args(argv)
    ckpt = Path(args.ckpt).expanduser()
    if not ckpt.is_file():
        print(f"wsi-ncmi natural evaluate: checkpoint not found: {ckpt}", file=sys.stderr)
        return 2
    data_kw = _load_checkpoint_hparams(ckpt)
    for name in _DATA_OVERRIDES:
        value = getattr(args, f"data.{name}")
        if value is not None:
            data_kw[name] = value
    data_kw["two_views"] = False
    accepted = set(inspect.signature(ImageDataModule.__init__).parameters) - {"self"}
    data_kw = {k: v for k, v in data_kw.items() if k in accepted}  # drops Lightning's "_instantiator"
    dm = ImageDataModule(**data_kw)
    dm.setup("validate")
    device = _device(args.device)
    module = ImageModule.load_from_checkpoint(str(ckpt), map_location="cpu", weights_only=True, weights=None)
    module = module.to(device).eval()
    result = evaluate_image_model(
        module.backbone,
        dm.train_eval_dataloader(),
        dm.val_dataloader(),
        dm.num_classes,
        head=module.head,
        ncmi=module.ncmi,
        protocols=args.protocols,
        lp=LinearProbeConfig(epochs=args.lp_epochs, lr=args.lp_lr, batch_size=args.lp_batch_size),
        device=device,
        channels_last=bool(module.hparams.channels_last) and device != "cpu",
    )
    result.update(checkpoint=str(ckpt), run=module.describe(), data={k: data_kw[k] for k in sorted(data_kw)})
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


# ---------------------------------------------------------------------------------------------------
# ncmi-metric (paper Figure 2)
# ---------------------------------------------------------------------------------------------------


def _metric_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="wsi-ncmi ncmi-metric",
        description="Top-1 and dataset-level NCMI of the softmax outputs of image classifiers (paper Fig. 2).",
    )
    p.add_argument("--model", required=True, help="resnet18 | resnet34 | resnet50 | resnet101")
    p.add_argument("--weights", nargs="+", required=True, help="local weight files (safetensors / torch state dict)")
    p.add_argument("--names", nargs="+", default=None, help="a label per weight file (default: file stem)")
    p.add_argument("--data", required=True, help="ImageFolder root: one sub-folder per class, in the model's order")
    p.add_argument("--limit", type=int, default=None, help="evaluate a seeded random subset of N images")
    p.add_argument("--image-size", type=int, default=224, help="evaluation crop size")
    p.add_argument("--crop-pct", type=float, default=0.875, help="resize short side to size/crop_pct, then crop")
    p.add_argument("--cifar-stem", action="store_true", help="3x3 stride-1 stem (CIFAR-style ResNet)")
    p.add_argument("--width", type=float, default=1.0, help="channel multiplier the weights were trained with")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="ncmi_metric_out", help="output folder")
    return p


def _table(rows: list[dict[str, Any]]) -> tuple[str, str]:
    cols = ["name", "top1", "top5", "cmi", "gamma", "ncmi", "n"]
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [str(r["name"])] + [f"{100 * r[c]:.2f}" for c in ("top1", "top5")]
        cells += [f"{r[c]:.4f}" for c in ("cmi", "gamma", "ncmi")] + [str(r["n"])]
        md.append("| " + " | ".join(cells) + " |")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols + ["weights"], lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: r[k] for k in cols + ["weights"]})
    return "\n".join(md) + "\n", buf.getvalue()


def main_ncmi_metric(argv: list[str] | None = None) -> int:
    """``wsi-ncmi ncmi-metric --model M --weights F [F ...] --data DIR [--limit N] [--out DIR]``."""
    import torch
    from torch.utils.data import DataLoader, Subset
    from torchvision.datasets import ImageFolder

    from wsi_ncmi.data.images import build_transform
    from wsi_ncmi.evaluation.image_eval import classifier_ncmi, pearson_r, plot_ncmi_vs_top1, write_json
    from wsi_ncmi.models.backbones import BackboneError, create_classifier, load_state_dict_file

    args = _metric_parser().parse_args(sys.argv[1:] if argv is None else argv)
    names = args.names or [Path(w).stem for w in args.weights]
    if len(names) != len(args.weights):
        print("wsi-ncmi ncmi-metric: --names needs one label per --weights file", file=sys.stderr)
        return 2
    root = Path(args.data).expanduser()
    if not root.is_dir():
        print(f"wsi-ncmi ncmi-metric: --data {root} is not a folder", file=sys.stderr)
        return 2
    tf = build_transform("imagenet", False, args.image_size, args.image_size, args.crop_pct)
    ds: Any = ImageFolder(str(root), transform=tf)
    num_classes = len(ds.classes)
    if args.limit is not None and args.limit < len(ds):
        g = torch.Generator().manual_seed(args.seed)
        ds = Subset(ds, torch.randperm(len(ds), generator=g)[: args.limit].tolist())
    loader = DataLoader(ds, batch_size=args.batch_size, shuffle=False, num_workers=args.workers)
    device = _device(args.device)
    rows: list[dict[str, Any]] = []
    for name, weights in zip(names, args.weights):
        try:
            sd = load_state_dict_file(weights)
            if "fc.weight" not in sd:
                raise BackboneError(f"{weights}: no classifier (fc.weight) in the state dict")
            n_out = int(sd["fc.weight"].shape[0])
            if n_out != num_classes:
                raise BackboneError(
                    f"{weights}: the model predicts {n_out} classes but {root} has {num_classes} class folders"
                )
            model = create_classifier(
                args.model, n_out, cifar_stem=args.cifar_stem, weights=weights, width=args.width
            )
        except BackboneError as err:
            print(f"wsi-ncmi ncmi-metric: {err}", file=sys.stderr)
            return 2
        model = model.to(device).eval()
        res = classifier_ncmi(model, loader, num_classes, device=device)
        rows.append({"name": name, "weights": str(weights), **res})
        logger.info("%s: top1 %.4f ncmi %.4f", name, res["top1"], res["ncmi"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md, csv_text = _table(rows)
    r = pearson_r([row["ncmi"] for row in rows], [row["top1"] for row in rows])
    md += f"\nPearson r(NCMI, top-1) = {r:.4f} over {len(rows)} models; data {root} ({rows[0]['n']} images)\n"
    atomic_write_text(out / "ncmi_vs_top1.md", md)
    atomic_write_text(out / "ncmi_vs_top1.csv", csv_text)
    plot_ncmi_vs_top1(rows, out / "ncmi_vs_top1.png")
    write_json(out / "ncmi_vs_top1.json", {"model": args.model, "data": str(root), "pearson_r": r, "rows": rows})
    print(md, end="")
    print(f"wrote {out}/ncmi_vs_top1.{{md,csv,png,json}}")
    return 0
