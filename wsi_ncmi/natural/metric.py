"""The paper's Figure-2 study behind ``wsi-ncmi ncmi-metric``: load image classifiers, score them, correlate.

* Weights: ``.safetensors``, a torch state dict or a ``wsi-ncmi natural fit`` Lightning ``.ckpt``, all read
  with ``weights_only=True`` (:mod:`wsi_ncmi.data.weights`); ``module.`` (DDP), ``model.`` and ``_orig_mod.``
  prefixes are stripped while every key carries one (:func:`strip_wrapper_prefixes`).
* Architecture per file (:func:`load_metric_model`): ``ARCH=FILE``, else the checkpoint's own
  hyper-parameters, else ``model``, else inferred from the ResNet layout of the state dict (:func:`infer_resnet`).
* Lightning checkpoints of CE-family runs use their ``head``; NCMI runs have no head, so their top-1 is the
  nearest **learned** centroid q = NSF(ξ) (``NCMILoss.centroid_kl``; ``classifier = xi_centroids``) and their
  NCMI is that of the NSF probabilities (``probs = nsf``), the simplex they were trained on.
* Data (:func:`metric_dataset`): an ImageFolder tree or a CIFAR-100 python folder, auto-detected.
* :func:`pearson_r`, :func:`plot_ncmi_vs_top1`: the correlation and the scatter over all models; the
  per-model measurement is :func:`wsi_ncmi.natural.evaluate.classifier_ncmi`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from wsi_ncmi.data.atomic import atomic_output
from wsi_ncmi.data.weights import strip_prefixes, unwrap_state_dict
from wsi_ncmi.errors import UserError
from wsi_ncmi.natural.backbones import BACKBONES, BackboneError, create_classifier, read_backbone_weights

__all__ = [
    "score_models",
    "METRIC_DATA",
    "LoadedModel",
    "NCMIMetricError",
    "WeightSpec",
    "infer_resnet",
    "load_metric_model",
    "metric_dataset",
    "parse_weight_spec",
    "pearson_r",
    "plot_ncmi_vs_top1",
    "read_weights",
    "strip_wrapper_prefixes",
    "to_device",
]

logger = logging.getLogger(__name__)


class NCMIMetricError(UserError):
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
        log_p = m.ncmi.log_probs(m.forward_features(x))  # [B, D]
        return -m.ncmi.centroid_kl(log_p), log_p.exp()  # [B, C], [B, D]

    def eval(self) -> _ImageModuleScorer:
        self.module.eval()
        return self


@dataclass
class LoadedModel:
    """One ``--weights`` entry ready to score: the callable, its architecture and what its outputs are."""

    model: Any  # nn.Module or _ImageModuleScorer: x -> logits [B, C] | (scores, probs)
    arch: str
    num_classes: int
    classifier: str  # "head" | "xi_centroids"
    probs: str  # "softmax" | "nsf"


def _load_image_module(spec: WeightSpec, sd: dict[str, Any], hparams: dict[str, Any]) -> LoadedModel:
    from wsi_ncmi.natural.module import ImageModule

    if spec.arch and spec.arch != hparams["backbone"]:
        raise NCMIMetricError(f"{spec.path}: the checkpoint is a {hparams['backbone']}, not a {spec.arch}")
    from wsi_ncmi.training.checkpoint import CheckpointError, checkpoint_hparams

    try:  # the settings are data: every key a constructor argument, plain values only, no class named
        kw = checkpoint_hparams(spec.path, {"hyper_parameters": hparams}, ImageModule)
    except CheckpointError as err:
        raise NCMIMetricError(str(err)) from None
    kw["weights"] = None  # the checkpoint's own tensors replace any initial weights
    module = ImageModule(**kw)
    try:
        module.load_state_dict(sd, strict=True)
    except RuntimeError as err:
        raise NCMIMetricError(f"{spec.path}: weights do not match its own hyper-parameters ({err})") from err
    if module.is_ncmi:
        return LoadedModel(_ImageModuleScorer(module), hparams["backbone"], module.num_classes, "xi_centroids", "nsf")
    return LoadedModel(_HeadClassifier(module), hparams["backbone"], module.num_classes, "head", "softmax")


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


def _load_classifier(
    spec: WeightSpec, sd: dict[str, Any], model: str | None, cifar_stem: bool | None, width: float | None
) -> LoadedModel:
    sd = _as_classifier_keys(sd, spec.path)
    if "fc.weight" not in sd:
        raise NCMIMetricError(f"{spec.path}: no classifier (fc.weight / head.weight) in the state dict")
    inferred = infer_resnet(sd)
    arch = spec.arch or model or (inferred[0] if inferred else None)
    if arch is None:
        raise NCMIMetricError(f"{spec.path}: cannot tell the architecture: give --model or ARCH={spec.path}")
    cifar_stem = cifar_stem if cifar_stem is not None else bool(inferred and inferred[1])
    width = width if width is not None else (inferred[2] if inferred else 1.0)
    n_out = int(sd["fc.weight"].shape[0])
    try:
        net = create_classifier(arch, n_out, cifar_stem=cifar_stem, width=width)
        net.load_state_dict(sd, strict=True)
    except (BackboneError, RuntimeError) as err:
        raise NCMIMetricError(f"{spec.path}: weights do not match a {arch} (cifar_stem={cifar_stem}, "
                              f"width={width}): {err}") from err  # fmt: skip
    return LoadedModel(net, arch, n_out, "head", "softmax")


def load_metric_model(
    spec: WeightSpec, model: str | None = None, cifar_stem: bool | None = None, width: float | None = None
) -> LoadedModel:
    """Build the model of one ``--weights`` entry.

    Architecture: ``ARCH=`` in the spec, else a Lightning checkpoint's ``hyper_parameters.backbone``, else
    ``--model``, else inferred from the state dict's ResNet layout; stem / width likewise (flags, else
    inferred from ``conv1.weight``).
    """
    sd, hparams = read_weights(spec.path)
    if _is_image_module_run(hparams):
        assert hparams is not None
        return _load_image_module(spec, sd, hparams)
    return _load_classifier(spec, sd, model, cifar_stem, width)


# -- evaluation data: name -> builder(root, split, image_size, crop_pct) -> (dataset, num_classes) ----------


def _cifar_root(root: Path) -> bool:
    return any(all((c / f).is_file() for f in ("train", "test", "meta")) for c in (root, root / "cifar-100-python"))


def _imagefolder_data(root: Path, split: str, image_size: int | None, crop_pct: float) -> tuple[Any, int]:
    from torchvision.datasets import ImageFolder

    from wsi_ncmi.natural.data import build_transform

    size = image_size or 224
    try:
        ds = ImageFolder(str(root), transform=build_transform("imagenet", False, size, size, crop_pct))
    except (FileNotFoundError, RuntimeError) as err:
        raise NCMIMetricError(f"--data {root}: not an ImageFolder (one sub-folder of images per class): {err}") from err
    return ds, len(ds.classes)


def _cifar_data(root: Path, split: str, image_size: int | None, crop_pct: float) -> tuple[Any, int]:
    from wsi_ncmi.natural.data import build_transform
    from wsi_ncmi.natural.datasets import CIFAR100, ImageDataError

    tf = build_transform("cifar", False, 32, image_size or 32)
    try:
        ds = CIFAR100(root, train=split == "train", transform=tf)
    except ImageDataError as err:
        raise NCMIMetricError(f"--data {root}: {err}") from err
    return ds, len(ds.classes)


METRIC_DATA: dict[str, Any] = {"imagefolder": _imagefolder_data, "cifar100": _cifar_data}


def metric_dataset(
    data: str | Path, dataset: str = "auto", split: str = "test", image_size: int | None = None, crop_pct: float = 0.875
) -> tuple[Any, int, str]:
    """``(dataset, num_classes, kind)`` for ``--data`` (``--dataset auto``: CIFAR-100 pickles, else ImageFolder)."""
    root = Path(data).expanduser()
    if not root.is_dir():
        raise NCMIMetricError(f"--data {root} is not a folder")
    kind = dataset
    if kind == "auto":
        kind = "cifar100" if _cifar_root(root) else "imagefolder"
    ds, num_classes = METRIC_DATA[kind](root, split, image_size, crop_pct)
    return ds, num_classes, kind


def to_device(model: Any, device: str) -> Any:
    """A :class:`LoadedModel` ``.model`` moved to ``device``, in eval mode."""
    if isinstance(model, (_ImageModuleScorer, _HeadClassifier)):
        model.module = model.module.to(device)
        return model.eval()
    return model.to(device).eval()


# -- Figure 2: the correlation and the scatter over all models ------------------------------------------


def score_models(specs: Sequence[WeightSpec], loader: Any, num_classes: int, data_name: str, *,
                 model: str | None = None, cifar_stem: bool | None = None, width: float | None = None,
                 device: str = "cpu") -> list[dict[str, Any]]:
    """One row per weight file: its classifier's top-1/top-5 on ``loader`` and the dataset-level CMI/Γ/NCMI of
    its probabilities (:func:`wsi_ncmi.natural.evaluate.classifier_ncmi`). Raises :class:`NCMIMetricError`
    naming the file when one cannot be loaded or predicts another number of classes than ``num_classes``."""
    from wsi_ncmi.natural.evaluate import classifier_ncmi

    rows: list[dict[str, Any]] = []
    for spec in specs:
        loaded = load_metric_model(spec, model, cifar_stem, width)
        if loaded.num_classes != num_classes:
            raise NCMIMetricError(
                f"{spec.path}: the model predicts {loaded.num_classes} classes but --data {data_name} "
                f"has {num_classes}"
            )
        res = classifier_ncmi(to_device(loaded.model, device), loader, num_classes, device=device)
        rows.append({"name": spec.name, "weights": str(spec.path), "arch": loaded.arch,
                     "classifier": loaded.classifier, "probs": loaded.probs, **res})  # fmt: skip
        logger.info("%s: top1 %.4f ncmi %.4f", spec.name, res["top1"], res["ncmi"])
    return rows


def pearson_r(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation of two equally long sequences (NaN for fewer than 2 points or zero variance)."""
    if len(x) != len(y):
        raise ValueError(f"pearson_r: lengths differ ({len(x)} vs {len(y)})")
    if len(x) < 2:
        return float("nan")
    a = torch.tensor(x, dtype=torch.float64)
    b = torch.tensor(y, dtype=torch.float64)
    a, b = a - a.mean(), b - b.mean()
    den = float(a.norm() * b.norm())
    return float((a * b).sum()) / den if den > 0 else float("nan")


def plot_ncmi_vs_top1(rows: Sequence[dict[str, Any]], path: str | Path, title: str | None = None) -> Path:
    """Scatter of NCMI (x) vs top-1 (y), one labelled point per row (``name``, ``ncmi``, ``top1``); PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
    xs = [float(r["ncmi"]) for r in rows]
    ys = [100.0 * float(r["top1"]) for r in rows]
    ax.scatter(xs, ys)
    for r, x, y in zip(rows, xs, ys):
        ax.annotate(str(r["name"]), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("NCMI of softmax outputs")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title or f"NCMI vs top-1 (Pearson r = {pearson_r(xs, ys):.3f})")
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
