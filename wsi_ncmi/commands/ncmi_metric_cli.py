"""`wsi-ncmi ncmi-metric`: NCMI vs top-1 over a set of image-classifier checkpoints (paper Figure 2).

``ncmi-metric --weights [ARCH=]FILE [...] --data DIR [--model ARCH]``: paper Figure 2 — for each
  checkpoint, top-1 of its own classifier and the dataset-level NCMI of its output probabilities; one
  markdown + CSV table, a scatter PNG and the Pearson r between NCMI and top-1 over all of them.

  - Weights: ``.safetensors``, a torch state dict or a ``wsi-ncmi natural fit`` Lightning ``.ckpt``, all
    read with ``weights_only=True``; ``module.`` (DDP), ``model.`` and ``_orig_mod.`` prefixes are stripped.
  - Architecture per file: ``ARCH=FILE``, else the checkpoint's own hyper-parameters, else ``--model``, else
    inferred from the ResNet layout of the state dict (stem and width from ``conv1.weight``).
  - Lightning checkpoints of CE-family runs use their ``head``; NCMI runs have no head, so their top-1 is
    the nearest **learned** centroid q = NSF(ξ) (column ``classifier = xi_centroids``; the closed-form CC
    of ``natural evaluate`` needs the training set) and their NCMI is that of the NSF probabilities
    (``probs = nsf``), the simplex they were trained on.
  - Data: an ImageFolder tree (class sub-folders) or a CIFAR-100 python folder (``--split test|train``),
    auto-detected (``--dataset``).
"""

from __future__ import annotations

import argparse
import csv
import inspect
import io
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsi_ncmi.data.atomic import atomic_write_text
from wsi_ncmi.data.weights import resolve_device, strip_prefixes

__all__ = [
    "main_ncmi_metric",
    "NCMIMetricError",
    "WeightSpec",
    "parse_weight_spec",
    "strip_wrapper_prefixes",
    "read_weights",
    "infer_resnet",
    "load_metric_model",
    "metric_dataset",
]

logger = logging.getLogger(__name__)



class NCMIMetricError(ValueError):
    """A bad ``wsi-ncmi ncmi-metric`` input: weight spec, checkpoint or data folder (names which and why)."""


# outer wrappers whose prefix is stripped when *every* key has it: DDP, a wrapper attribute, torch.compile
_WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.")
# ImageModule state-dict names -> timm ResNet classifier names (a plain ``module.state_dict()`` file)
_IMAGE_MODULE_RENAMES = (("backbone.", ""), ("head.", "fc."))
_IMAGE_MODULE_DROPPED = ("criterion.", "proj.")
# ResNet depth fingerprint: (blocks in layer3, bottleneck blocks) -> timm name
_RESNET_FINGERPRINTS = {(2, False): "resnet18", (6, False): "resnet34", (6, True): "resnet50", (23, True): "resnet101"}


@dataclass(frozen=True)
class WeightSpec:
    """One ``--weights`` entry: ``PATH`` or ``ARCH=PATH`` (ARCH one of resnet18|34|50|101)."""

    name: str
    path: Path
    arch: str | None = None


def parse_weight_spec(text: str, name: str | None = None) -> WeightSpec:
    """``"resnet50=/w/a.pth"`` -> arch resnet50; ``"/w/a.pth"`` -> no arch. ``name`` defaults to the file stem."""
    from wsi_ncmi.natural.backbones import BACKBONES

    arch, sep, rest = text.partition("=")
    if sep and arch in BACKBONES:
        path = Path(rest).expanduser()
    elif sep and not Path(text).expanduser().exists() and "/" not in arch and "\\" not in arch:
        raise NCMIMetricError(
            f"--weights {text!r}: no such file, and {arch!r} is not an architecture (one of {', '.join(BACKBONES)})"
        )
    else:
        arch, path = "", Path(text).expanduser()
    return WeightSpec(name=name or path.stem, path=path, arch=arch or None)


def strip_wrapper_prefixes(sd: dict[str, Any]) -> dict[str, Any]:
    """Remove ``module.`` (DDP), ``model.`` and ``_orig_mod.`` (torch.compile) while every key starts with one."""
    return strip_prefixes(sd, _WRAPPER_PREFIXES, every_key=True)


def read_weights(path: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``(state_dict, hyper_parameters or None)`` of a safetensors file, a torch state dict or a Lightning ckpt.

    Torch files are read with ``torch.load(weights_only=True)``; ``{"state_dict": ...}`` (Lightning, with its
    ``hyper_parameters``) and ``{"model": ...}`` / ``{"module": ...}`` wrappers are unwrapped, then
    :func:`strip_wrapper_prefixes` is applied.
    """
    import torch

    from wsi_ncmi.data.weights import unwrap_state_dict
    from wsi_ncmi.natural.backbones import BackboneError, read_backbone_weights

    try:
        raw = read_backbone_weights(path)
    except BackboneError as err:
        raise NCMIMetricError(str(err)) from err
    hparams: dict[str, Any] | None = None
    if isinstance(raw, dict) and isinstance(raw.get("hyper_parameters"), dict):
        hparams = dict(raw["hyper_parameters"])
    sd = unwrap_state_dict(raw, ("state_dict", "model", "module"))
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise NCMIMetricError(f"{path}: not a state dict of tensors")
    return strip_wrapper_prefixes(sd), hparams


def _is_image_module_run(hparams: dict[str, Any] | None) -> bool:
    return bool(hparams) and "backbone" in hparams and "objective" in hparams  # type: ignore[operator]


def infer_resnet(sd: dict[str, Any]) -> tuple[str, bool, float] | None:
    """``(arch, cifar_stem, width)`` of a timm/torchvision ResNet state dict, or None when it is not one."""
    conv1, first = sd.get("conv1.weight"), sd.get("layer1.0.conv1.weight")
    if conv1 is None or first is None or conv1.ndim != 4 or first.ndim != 4:
        return None
    blocks = {int(k.split(".")[1]) for k in sd if k.startswith("layer3.") and k.split(".")[1].isdigit()}
    bottleneck = any(k.startswith("layer1.0.conv3.") for k in sd)
    arch = _RESNET_FINGERPRINTS.get((len(blocks), bottleneck))
    if arch is None:
        return None
    return arch, int(conv1.shape[-1]) == 3, int(first.shape[0]) / 64.0  # stage-1 width / 64 (timm's stem stays 64)


class _ImageModuleScorer:
    """``x -> (scores [B, C], probs [B, D])`` of an NCMI ImageModule: −KL to its learned centroids q = NSF(ξ)."""

    def __init__(self, module: Any) -> None:
        self.module = module

    def __call__(self, x: Any) -> Any:
        m = self.module
        log_p = m.criterion.log_probs(m.forward_features(x))  # [B, D]
        return -m.criterion.centroid_kl(log_p), log_p.exp()  # [B, C], [B, D]

    def eval(self) -> _ImageModuleScorer:
        self.module.eval()
        return self


@dataclass
class _LoadedModel:
    model: Any  # nn.Module or _ImageModuleScorer: x -> logits [B, C] | (scores, probs)
    arch: str
    num_classes: int
    classifier: str  # "head" | "xi_centroids"
    probs: str  # "softmax" | "nsf"


def _load_image_module(spec: WeightSpec, sd: dict[str, Any], hparams: dict[str, Any]) -> _LoadedModel:
    from wsi_ncmi.natural.module import ImageModule

    if spec.arch and spec.arch != hparams["backbone"]:
        raise NCMIMetricError(f"{spec.path}: the checkpoint is a {hparams['backbone']}, not a {spec.arch}")
    accepted = set(inspect.signature(ImageModule.__init__).parameters) - {"self"}
    kw = {k: v for k, v in hparams.items() if k in accepted}
    kw["weights"] = None  # the checkpoint's own tensors replace any initial weights
    module = ImageModule(**kw)
    try:
        module.load_state_dict(sd, strict=True)
    except RuntimeError as err:
        raise NCMIMetricError(f"{spec.path}: weights do not match its own hyper-parameters ({err})") from err
    if module.is_ncmi:
        return _LoadedModel(_ImageModuleScorer(module), hparams["backbone"], module.num_classes, "xi_centroids", "nsf")
    return _LoadedModel(_HeadClassifier(module), hparams["backbone"], module.num_classes, "head", "softmax")


class _HeadClassifier:
    """``x -> head(backbone(x))`` logits [B, C] of a head-objective ImageModule (CE family, SupCon probe)."""

    def __init__(self, module: Any) -> None:
        self.module = module

    def __call__(self, x: Any) -> Any:
        return self.module.head(self.module.forward_features(x))

    def eval(self) -> _HeadClassifier:
        self.module.eval()
        return self


def _as_classifier_keys(sd: dict[str, Any], path: Path) -> dict[str, Any]:
    """A plain ImageModule state dict (``backbone.*``, ``head.*``) -> timm classifier keys (``*``, ``fc.*``)."""
    if not any(k.startswith("backbone.") for k in sd):
        return sd
    if not any(k.startswith("head.") for k in sd):
        raise NCMIMetricError(
            f"{path}: an NCMI network without classifier head and without its hyper-parameters: pass the "
            "Lightning .ckpt written by `wsi-ncmi natural fit` (it carries the NCMI loss settings)"
        )
    out = {}
    for k, v in sd.items():
        if k.startswith(_IMAGE_MODULE_DROPPED):
            continue
        for old, new in _IMAGE_MODULE_RENAMES:
            if k.startswith(old):
                out[new + k[len(old) :]] = v
                break
    return out


def _load_classifier(spec: WeightSpec, sd: dict[str, Any], args: argparse.Namespace) -> _LoadedModel:
    from wsi_ncmi.natural.backbones import BackboneError, create_classifier

    sd = _as_classifier_keys(sd, spec.path)
    if "fc.weight" not in sd:
        raise NCMIMetricError(f"{spec.path}: no classifier (fc.weight / head.weight) in the state dict")
    inferred = infer_resnet(sd)
    arch = spec.arch or args.model or (inferred[0] if inferred else None)
    if arch is None:
        raise NCMIMetricError(f"{spec.path}: cannot tell the architecture: give --model or ARCH={spec.path}")
    cifar_stem = args.cifar_stem if args.cifar_stem is not None else bool(inferred and inferred[1])
    width = args.width if args.width is not None else (inferred[2] if inferred else 1.0)
    n_out = int(sd["fc.weight"].shape[0])
    try:
        model = create_classifier(arch, n_out, cifar_stem=cifar_stem, width=width)
        model.load_state_dict(sd, strict=True)
    except (BackboneError, RuntimeError) as err:
        raise NCMIMetricError(f"{spec.path}: weights do not match a {arch} (cifar_stem={cifar_stem}, "
                              f"width={width}): {err}") from err  # fmt: skip
    return _LoadedModel(model, arch, n_out, "head", "softmax")


def load_metric_model(spec: WeightSpec, args: argparse.Namespace) -> _LoadedModel:
    """Build the model of one ``--weights`` entry.

    Architecture: ``ARCH=`` in the spec, else a Lightning checkpoint's ``hyper_parameters.backbone``, else
    ``--model``, else inferred from the state dict's ResNet layout; stem / width likewise (flags, else
    inferred from ``conv1.weight``).
    """
    sd, hparams = read_weights(spec.path)
    if _is_image_module_run(hparams):
        assert hparams is not None
        return _load_image_module(spec, sd, hparams)
    return _load_classifier(spec, sd, args)


# -- evaluation data: name -> builder(args, root) -> (dataset, num_classes) ------------------------------


def _cifar_root(root: Path) -> bool:
    return any(all((c / f).is_file() for f in ("train", "test", "meta")) for c in (root, root / "cifar-100-python"))


def _imagefolder_data(args: argparse.Namespace, root: Path) -> tuple[Any, int]:
    from torchvision.datasets import ImageFolder

    from wsi_ncmi.natural.data import build_transform

    size = args.image_size or 224
    try:
        ds = ImageFolder(str(root), transform=build_transform("imagenet", False, size, size, args.crop_pct))
    except (FileNotFoundError, RuntimeError) as err:
        raise NCMIMetricError(f"--data {root}: not an ImageFolder (one sub-folder of images per class): {err}") from err
    return ds, len(ds.classes)


def _cifar_data(args: argparse.Namespace, root: Path) -> tuple[Any, int]:
    from wsi_ncmi.natural.data import CIFAR100, ImageDataError, build_transform

    tf = build_transform("cifar", False, 32, args.image_size or 32)
    try:
        ds = CIFAR100(root, train=args.split == "train", transform=tf)
    except ImageDataError as err:
        raise NCMIMetricError(f"--data {root}: {err}") from err
    return ds, len(ds.classes)


_METRIC_DATA: dict[str, Any] = {"imagefolder": _imagefolder_data, "cifar100": _cifar_data}


def metric_dataset(args: argparse.Namespace) -> tuple[Any, int, str]:
    """``(dataset, num_classes, kind)`` for ``--data`` (``--dataset auto``: CIFAR-100 pickles, else ImageFolder)."""
    root = Path(args.data).expanduser()
    if not root.is_dir():
        raise NCMIMetricError(f"--data {root} is not a folder")
    kind = args.dataset
    if kind == "auto":
        kind = "cifar100" if _cifar_root(root) else "imagefolder"
    ds, num_classes = _METRIC_DATA[kind](args, root)
    return ds, num_classes, kind


def _metric_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="wsi-ncmi ncmi-metric",
        description="Top-1 and dataset-level NCMI of the softmax outputs of image classifiers (paper Fig. 2).",
    )
    p.add_argument(
        "--weights", nargs="+", required=True, metavar="[ARCH=]FILE",
        help="local weights, one per model: safetensors, a torch state dict or a `wsi-ncmi natural fit` "
        "Lightning .ckpt; ARCH=FILE (resnet18|resnet34|resnet50|resnet101) sets the architecture per file",
    )  # fmt: skip
    p.add_argument("--model", default=None, help="architecture for FILEs without ARCH= (default: inferred)")
    p.add_argument("--names", nargs="+", default=None, help="a label per weight file (default: file stem)")
    p.add_argument("--data", required=True, help="ImageFolder root (class sub-folders) or a CIFAR-100 python folder")
    p.add_argument("--dataset", default="auto", choices=["auto", *_METRIC_DATA], help="how to read --data")
    p.add_argument("--split", default="test", choices=["test", "train"], help="CIFAR-100 split")
    p.add_argument("--limit", type=int, default=None, help="evaluate a seeded random subset of N images")
    p.add_argument("--image-size", type=int, default=None, help="evaluation size (224 ImageFolder, 32 CIFAR)")
    p.add_argument("--crop-pct", type=float, default=0.875, help="resize short side to size/crop_pct, then crop")
    p.add_argument("--cifar-stem", action="store_const", const=True, default=None,
                   help="3x3 stride-1 stem (default: inferred from conv1.weight)")  # fmt: skip
    p.add_argument("--width", type=float, default=None, help="channel multiplier (default: inferred)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="ncmi_metric_out", help="output folder")
    return p


_TABLE_COLS = ["name", "arch", "classifier", "probs", "top1", "top5", "cmi", "gamma", "ncmi", "n"]


def _table(rows: list[dict[str, Any]]) -> tuple[str, str]:
    md = ["| " + " | ".join(_TABLE_COLS) + " |", "|" + "---|" * len(_TABLE_COLS)]
    for r in rows:
        cells = [str(r[c]) for c in ("name", "arch", "classifier", "probs")]
        cells += [f"{100 * r[c]:.2f}" for c in ("top1", "top5")]
        cells += [f"{r[c]:.4f}" for c in ("cmi", "gamma", "ncmi")] + [str(r["n"])]
        md.append("| " + " | ".join(cells) + " |")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=_TABLE_COLS + ["weights"], lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: r[k] for k in _TABLE_COLS + ["weights"]})
    return "\n".join(md) + "\n", buf.getvalue()


def _specs(args: argparse.Namespace) -> list[WeightSpec]:
    if args.names is not None and len(args.names) != len(args.weights):
        raise NCMIMetricError("--names needs one label per --weights file")
    names = args.names or [None] * len(args.weights)
    specs = [parse_weight_spec(w, n) for w, n in zip(args.weights, names)]
    seen: dict[str, int] = {}
    for i, spec in enumerate(specs):  # Lightning names every run's file alike (epoch=N-step=M.ckpt)
        seen[spec.name] = seen.get(spec.name, 0) + 1
        if seen[spec.name] > 1:
            specs[i] = WeightSpec(name=f"{spec.name}-{seen[spec.name]}", path=spec.path, arch=spec.arch)
    return specs


def main_ncmi_metric(argv: list[str] | None = None) -> int:
    """``wsi-ncmi ncmi-metric --weights [ARCH=]F [...] --data DIR [--model M] [--limit N] [--out DIR]``.

    One row per weights file: top-1/top-5 of the model's own classifier and the dataset-level CMI/Γ/NCMI
    of its probabilities. Head models (timm/torchvision ResNets, CE-family runs): softmax of the logits.
    NCMI runs (no head; their Lightning .ckpt is needed): top-1 of the nearest **learned** centroid
    q = NSF(ξ) (closed-form CC needs the training set, see ``natural evaluate``) and the NCMI of the NSF
    probabilities (the simplex the run was trained on, so not the same space as a softmax row).
    """
    import torch
    from torch.utils.data import DataLoader, Subset

    from wsi_ncmi.natural.evaluate import classifier_ncmi, pearson_r, plot_ncmi_vs_top1, write_json

    args = _metric_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        specs = _specs(args)
        ds, num_classes, kind = metric_dataset(args)
    except NCMIMetricError as err:
        print(f"wsi-ncmi ncmi-metric: {err}", file=sys.stderr)
        return 2
    if args.limit is not None and args.limit < len(ds):
        g = torch.Generator().manual_seed(args.seed)
        ds = Subset(ds, torch.randperm(len(ds), generator=g)[: args.limit].tolist())
    loader = DataLoader(ds, batch_size=args.batch_size, shuffle=False, num_workers=args.workers)
    device = resolve_device(args.device)
    rows: list[dict[str, Any]] = []
    for spec in specs:
        try:
            loaded = load_metric_model(spec, args)
            if loaded.num_classes != num_classes:
                raise NCMIMetricError(
                    f"{spec.path}: the model predicts {loaded.num_classes} classes but --data {args.data} "
                    f"({kind}) has {num_classes}"
                )
        except NCMIMetricError as err:
            print(f"wsi-ncmi ncmi-metric: {err}", file=sys.stderr)
            return 2
        model = _to_device(loaded.model, device)
        res = classifier_ncmi(model, loader, num_classes, device=device)
        rows.append({"name": spec.name, "weights": str(spec.path), "arch": loaded.arch,
                     "classifier": loaded.classifier, "probs": loaded.probs, **res})  # fmt: skip
        logger.info("%s: top1 %.4f ncmi %.4f", spec.name, res["top1"], res["ncmi"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md, csv_text = _table(rows)
    r = pearson_r([row["ncmi"] for row in rows], [row["top1"] for row in rows])
    md += f"\nPearson r(NCMI, top-1) = {r:.4f} over {len(rows)} models; data {args.data} ({rows[0]['n']} images)\n"
    if len({row["probs"] for row in rows}) > 1:
        md += "\nNote: NCMI of NSF outputs (NCMI runs) and of softmax outputs lie on different simplices.\n"
    atomic_write_text(out / "ncmi_vs_top1.md", md)
    atomic_write_text(out / "ncmi_vs_top1.csv", csv_text)
    plot_ncmi_vs_top1(rows, out / "ncmi_vs_top1.png")
    write_json(
        out / "ncmi_vs_top1.json",
        {"model": args.model, "data": str(args.data), "dataset": kind, "pearson_r": r, "rows": rows},
    )
    print(md, end="")
    print(f"wrote {out}/ncmi_vs_top1.{{md,csv,png,json}}")
    return 0


def _to_device(model: Any, device: str) -> Any:
    if isinstance(model, (_ImageModuleScorer, _HeadClassifier)):
        model.module = model.module.to(device)
        return model.eval()
    return model.to(device).eval()
