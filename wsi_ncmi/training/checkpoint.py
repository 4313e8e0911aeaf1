"""Reading checkpoint files safely: the one gate every ``.ckpt`` passes before Lightning or a module sees it.

``read_checkpoint(path)`` loads with ``torch.load(weights_only=True)`` (explicitly: an explicit ``True`` also
holds when ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` is set, which only changes the default), so a file that would
need a full unpickle, and could run code doing so, is refused before anything else reads it. Every failure is a
:class:`CheckpointError` with one line naming the file and the problem:

* objects other than tensors / plain containers (``GLOBAL posix.system``...): refused, never unpickled;
* a truncated or corrupt file (torch's zip reader or ``OSError`` without the file name);
* a file of another kind (a plain pickle, a safetensors file, or a pickle renamed ``.safetensors``);
* a dictionary without ``state_dict``: not a Lightning checkpoint.

``load_mil_module(path, device)`` is the one loader of a ``MILModule`` checkpoint (``wsi-ncmi evaluate``,
``predict``, ``heatmap`` and the demo): the file goes through ``read_checkpoint`` first, then Lightning rebuilds the
module with ``weights_only=True``; the module comes back in eval mode on ``device`` with the checkpoint dictionary.

``checkpoint_datamodule(module, checkpoint, ...)`` rebuilds the ``MILDataModule`` a checkpoint was trained with
(its recorded datamodule hyper-parameters, paths overridable), after the pre-flight check of ``fit`` against
the model's ``in_dim``: what ``wsi-ncmi evaluate`` and the demo evaluate on.

``resolve_ckpt_path(ckpt_path, dirs)`` turns Lightning's ``"last"`` into the newest ``last*.ckpt`` in ``dirs``
(as Lightning does), so the file can be checked before ``Trainer.fit(ckpt_path="last")`` opens it.

:class:`WeightsOnlyCLI` is the mixin both LightningCLIs (``wsi-ncmi fit|validate|test`` and ``wsi-ncmi natural
...``) put in front of ``LightningCLI``: the ``--ckpt_path`` file goes through ``read_checkpoint`` before
LightningCLI reads its hyper-parameters and before the trainer loads it, the trainer is always called with
``weights_only=True`` and ``--weights_only false`` is refused.

**Hyper-parameters are data.** A checkpoint that passes ``weights_only=True`` can still hold strings that name
code (a ``class_path`` under a kwargs dict, Lightning's ``_instantiator``), which Lightning or jsonargparse
would import and instantiate. So no module is ever rebuilt by Lightning from a file: :func:`load_module` checks
the file's ``hyper_parameters`` against the module's own constructor (:func:`checkpoint_hparams`: every key a
constructor argument, every value plain data of the annotated type, no ``class_path`` anywhere, see
:mod:`wsi_ncmi.data.plain`), calls the constructor itself (models, losses and optimizers are chosen by
registry name there) and loads the state dict. The LightningCLIs merge the hyper-parameters of ``--ckpt_path``
only after the same check, and refuse a checkpoint whose model differs from the config's
(``STRUCTURE_HPARAMS`` of the module). A file of the other track is named as such (``CHECKPOINT_KIND``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from wsi_ncmi.errors import UserError

__all__ = ["CheckpointError", "WeightsOnlyCLI", "checkpoint_datamodule", "checkpoint_hparams", "checkpoint_kind",
           "load_mil_module", "load_module", "read_checkpoint", "resolve_ckpt_path"]

logger = logging.getLogger(__name__)

_FIT_HINT = "use a .ckpt written by `wsi-ncmi fit` (or `wsi-ncmi natural fit`)"
#: Lightning's bookkeeping entry in hyper-parameters saved under LightningCLI: accepted with this value only, and
#: never used (nothing a file names is imported)
_LIGHTNING_INSTANTIATOR = {"_instantiator": "lightning.pytorch.cli.instantiate_module"}
#: kind of checkpoint -> (the hyper-parameter that marks it, the commands that read it)
CHECKPOINT_KINDS: dict[str, tuple[str, str]] = {
    "mil": ("in_dim", "a MIL checkpoint (written by `wsi-ncmi fit`): use it with `wsi-ncmi evaluate | predict | "
                      "heatmap --ckpt` or `wsi-ncmi fit | validate | test --ckpt_path`"),
    "natural": ("backbone", "a natural-image checkpoint (written by `wsi-ncmi natural fit`): use it with "
                            "`wsi-ncmi natural evaluate --ckpt` or `wsi-ncmi natural fit | validate | test --ckpt_path`"),
}


class CheckpointError(UserError):
    """A checkpoint file cannot be used; the message (one line) names the file and the problem."""


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


def read_checkpoint(path: str | Path, require_state_dict: bool = True) -> dict[str, Any]:
    """The checkpoint dictionary of ``path``, read with ``torch.load(weights_only=True)`` on the CPU.

    Raises :class:`CheckpointError` (one line naming ``path``) for a missing, malicious, truncated or foreign
    file, and (``require_state_dict``) for a dictionary without ``state_dict``.
    """
    import pickle

    import torch

    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: a folder, not a checkpoint file; {_FIT_HINT}, e.g. <run>/checkpoints/best.ckpt")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL (\S+)", str(err))
        if found or "Weights only load failed" in str(err):
            what = f"a Python object ({found.group(1)})" if found else "Python objects"
            raise CheckpointError(
                f"{path}: refused: the file holds {what} that only a full unpickle could rebuild, which can run code; "
                f"checkpoints are read with weights_only=True only; {_FIT_HINT}"
            ) from None
        raise CheckpointError(f"{path}: not a torch checkpoint ({_first_line(err)}); {_FIT_HINT}") from None
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({_first_line(err)}); {_FIT_HINT}, "
                              f"e.g. checkpoints/best.ckpt or an earlier copy") from None
    except Exception as err:  # noqa: BLE001 - safetensors' own error type and other readers' failures
        raise CheckpointError(f"{path}: not a torch checkpoint ({_first_line(err)}); {_FIT_HINT}") from None
    if require_state_dict and not (isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict)):
        raise CheckpointError(f"{path}: not a Lightning checkpoint (no state_dict); {_FIT_HINT}")
    return obj


def checkpoint_kind(hparams: Mapping[str, Any]) -> str | None:
    """``"mil"`` / ``"natural"`` (:data:`CHECKPOINT_KINDS`) from the keys of a checkpoint's hyper-parameters."""
    for kind, (marker, _) in CHECKPOINT_KINDS.items():
        if marker in hparams:
            return kind
    return None


def checkpoint_hparams(path: str | Path, checkpoint: Mapping[str, Any], module_cls: type,
                       key: str = "hyper_parameters") -> dict[str, Any]:
    """The constructor arguments of ``module_cls`` stored under ``checkpoint[key]``, checked as data.

    ``module_cls.CHECKPOINT_KIND`` (when set) must be the file's kind (a natural-image checkpoint given to a MIL
    command is named as such); every key must be a constructor argument and every value plain data of its
    annotated type, with no ``class_path`` / ``init_args`` anywhere (:func:`wsi_ncmi.data.plain.check_signature_values`).
    Nothing is imported or instantiated here. Raises :class:`CheckpointError`, one line naming ``path`` and the key.
    """
    from wsi_ncmi.data.plain import PlainValueError, check_signature_values

    raw = checkpoint.get(key)
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"{path}: {key} is a {type(raw).__name__}, not a dictionary of settings; {_FIT_HINT}")
    expected = getattr(module_cls, "CHECKPOINT_KIND", None)
    found = checkpoint_kind(raw) if key == "hyper_parameters" else None
    if expected is not None and found is not None and found != expected:
        raise CheckpointError(f"{path}: {CHECKPOINT_KINDS[found][1]}")
    try:
        return check_signature_values(module_cls, raw, f"{path}: {key}", ignore=_LIGHTNING_INSTANTIATOR)
    except PlainValueError as err:
        raise CheckpointError(str(err)) from None


def load_module(path: str | Path, module_cls: type, device: str = "cpu",
                overrides: Mapping[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
    """``(module, checkpoint)``: ``module_cls`` rebuilt from the checked hyper-parameters of ``path``
    (:func:`checkpoint_hparams`, then ``overrides``) by its own constructor, its state dict loaded (strict), in
    eval mode on ``device``. The file is read by :func:`read_checkpoint`; Lightning never instantiates from it.
    Raises :class:`CheckpointError` in one line naming ``path``.
    """
    state = read_checkpoint(path)
    hparams = checkpoint_hparams(path, state, module_cls)
    hparams.update(overrides or {})
    try:
        module = module_cls(**hparams)
    except (ValueError, TypeError, KeyError) as err:
        raise CheckpointError(f"{path}: its settings do not build a {module_cls.__name__} ({_first_line(err)})") from None
    module.on_load_checkpoint(state)
    try:
        module.load_state_dict(state["state_dict"], strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: its weights do not fit the model its settings describe "
                              f"({_first_line(err)[:300]})") from None
    module.eval()
    return module.to(device), state


def load_mil_module(path: str | Path, device: str = "cpu") -> tuple[Any, dict[str, Any]]:
    """``(module, checkpoint)``: the ``MILModule`` of ``path`` in eval mode on ``device`` and the checkpoint's
    dictionary (for what the module does not carry: datamodule hyper-parameters, provenance, training seed).

    :func:`load_module` with ``MILModule``: a missing, malicious, truncated or foreign file, or one whose
    settings are not plain data of the module's constructor, raises :class:`CheckpointError` in one line naming it.
    """
    from wsi_ncmi.data import MILDataModule
    from wsi_ncmi.training.mil_module import MILModule

    module, state = load_module(path, MILModule, device)
    # the datamodule settings are data too (checkpoint_datamodule builds from them): checked the same way
    state["datamodule_hyper_parameters"] = checkpoint_hparams(path, state, MILDataModule,
                                                              key="datamodule_hyper_parameters")
    return module, state


def checkpoint_datamodule(module: Any, checkpoint: Mapping[str, Any], bags_dir: str | Path | None = None,
                          split_csv: str | Path | None = None, fold: int | None = None, num_workers: int = 0,
                          allow_patient_leak: bool = False, leak_flag: str = "--allow-patient-leak") -> Any:
    """The ``MILDataModule`` (batch size 1) of the split ``module`` (a loaded ``MILModule``) is evaluated on.

    ``label_map``, ``fold`` and, when not given, ``bags_dir`` / ``split_csv`` come from ``checkpoint``'s datamodule
    hyper-parameters. The split table is checked against the bags folder first, as ``fit`` does
    (``preflight_check`` with the model's ``in_dim``: missing bags, other feature dims, a patient in two splits
    unless ``allow_patient_leak``); the accepted leaks are stored on the datamodule as ``patient_leaks``.
    Raises :class:`CheckpointError` when the paths are neither given nor recorded, or the class counts differ.
    """
    from wsi_ncmi.data import MILDataModule
    from wsi_ncmi.data.split_check import preflight_check

    num_classes, in_dim = int(module.hparams["num_classes"]), module.model.in_dim
    hp = checkpoint.get("datamodule_hyper_parameters") or {}
    hp = dict(hp) if isinstance(hp, Mapping) else {}
    bags_dir = bags_dir or hp.get("bags_dir")
    split_csv = split_csv or hp.get("split_csv")
    if not bags_dir or not split_csv:
        raise CheckpointError(
            "--data.bags_dir and --data.split_csv are required (the checkpoint does not record them)"
        )
    fold = fold if fold is not None else hp.get("fold")
    check = preflight_check(bags_dir, split_csv, num_classes=num_classes, in_dim=in_dim, fold=fold,
                            check_labels=not hp.get("label_map"), allow_patient_leak=allow_patient_leak,
                            leak_flag=leak_flag)
    dm = MILDataModule(
        bags_dir=str(bags_dir),
        split_csv=str(split_csv),
        batch_size=1,
        num_workers=num_workers,
        label_map=hp.get("label_map"),
        num_classes=num_classes,
        fold=fold,
        pin_memory=False,
        cache="none",  # each bag is embedded once, at its stored dtype, as `wsi-ncmi predict` reads it
        _split_bags=check.resolved,  # the split the check resolved: one folder listing
    )
    if dm.num_classes != num_classes:
        raise CheckpointError(
            f"--data.split_csv {split_csv}: {dm.num_classes} classes, the checkpoint has {num_classes}"
        )
    dm.patient_leaks = check.patient_leaks
    return dm


def resolve_ckpt_path(ckpt_path: str | Path | None, dirs: Iterable[str | Path | None]) -> Path | None:
    """The file ``ckpt_path`` names: a path as given; ``"last"``: the newest ``last*.ckpt`` in ``dirs`` (None
    when there is none, like Lightning, which then starts from scratch); ``"best"`` / ``"hpc"`` / registry names
    are resolved by Lightning (None here; it still loads them with ``weights_only=True``)."""
    if ckpt_path is None:
        return None
    if str(ckpt_path) == "last":
        found = [p for d in dirs if d is not None and Path(d).is_dir()
                 for p in Path(d).iterdir() if p.suffix == ".ckpt" and re.match(r"^last(-\d+)?$", p.stem)]
        return max(found, key=lambda p: p.stat().st_mtime) if found else None
    if str(ckpt_path) in ("best", "hpc") or str(ckpt_path).startswith("registry"):
        return None
    return Path(ckpt_path)


class WeightsOnlyCLI:
    """Mixin for a ``LightningCLI`` subclass (``class MyCLI(WeightsOnlyCLI, LightningCLI)``): every checkpoint the
    CLI hands to Lightning is read here first with ``weights_only=True`` and Lightning is told ``weights_only=True``
    (an explicit value: ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` only changes torch's default)."""

    _checked_ckpts: dict[Path, dict[str, Any]]  # path -> {"hyper_parameters": ...} of each file read

    def read_ckpt_once(self, path: str | Path) -> dict[str, Any]:
        """:func:`read_checkpoint` of ``path`` unless this CLI read it already; the checkpoint's
        ``hyper_parameters`` entry only (the weights are not kept: the trainer reads the file again)."""
        checked = self.__dict__.setdefault("_checked_ckpts", {})
        path = Path(path)
        if path not in checked:
            checked[path] = {"hyper_parameters": read_checkpoint(path).get("hyper_parameters")}
        return checked[path]

    def checkpoint_dirs(self) -> list[str | Path | None]:
        """Where ``--ckpt_path last`` is looked up: the trainer's ``ModelCheckpoint`` folders (when set)."""
        trainer = getattr(self, "trainer", None)
        return [getattr(cb, "dirpath", None) for cb in getattr(trainer, "checkpoint_callbacks", [])]

    def check_ckpt_args(self, ckpt_path: Any, weights_only: Any, dirs: Iterable[str | Path | None]) -> None:
        """Refuse ``weights_only=False``; read the file ``ckpt_path`` names (``last`` resolved in ``dirs``)."""
        if weights_only is False:
            raise CheckpointError(f"--weights_only false: refused for --ckpt_path {ckpt_path}; checkpoints are "
                                  "only read with weights_only=True (unpickling can run code)")
        path = resolve_ckpt_path(ckpt_path, dirs)
        if path is not None:
            self.read_ckpt_once(path)

    def check_same_model(self, path: str | Path, hparams: Mapping[str, Any], model_cfg: Any) -> None:
        """Refuse a ``--ckpt_path`` whose network settings (``STRUCTURE_HPARAMS`` of the model class) differ from
        the config's: LightningCLI would silently train the checkpoint's model in this config's run folder."""
        keys = getattr(self.model_class, "STRUCTURE_HPARAMS", ())  # type: ignore[attr-defined]
        differ = []
        for key in keys:
            if key not in hparams or model_cfg is None or model_cfg.get(key) is None:
                continue
            mine = model_cfg.get(key)
            mine = dict(mine) if isinstance(mine, Mapping) or hasattr(mine, "items") else mine
            if mine != hparams[key]:
                differ.append(f"{key}={hparams[key]!r} (config: {mine!r})")
        if differ:
            raise CheckpointError(
                f"--ckpt_path {path}: the checkpoint was trained with {', '.join(differ)}; resume it with its own "
                "config (-c <its run folder>/config.yaml) or start a new run without --ckpt_path"
            )

    def _parse_ckpt_path(self) -> None:
        # LightningCLI merges the hyper-parameters of a --ckpt_path file into the config (and jsonargparse would
        # build whatever class they name): they are checked as plain data of the module's constructor first,
        # Lightning's own reader (which would also merge a `_class_path`) is never called
        config = self.config  # type: ignore[attr-defined]
        sub = config.get("subcommand")
        path = config[sub].get("ckpt_path") if sub else None
        if not path or not Path(path).is_file():
            return
        state = self.read_ckpt_once(path)
        hparams = checkpoint_hparams(path, state, self.model_class)  # type: ignore[attr-defined]
        if not hparams:
            return
        self.check_same_model(path, hparams, config[sub].get("model"))
        self.config = self.parser.parse_object({sub: {"model": hparams}}, config)  # type: ignore[attr-defined]

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict[str, Any]:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)  # type: ignore[misc]
        if "ckpt_path" in kwargs or "weights_only" in kwargs:
            self.check_ckpt_args(kwargs.get("ckpt_path"), kwargs.get("weights_only"), self.checkpoint_dirs())
            kwargs["weights_only"] = True
        return kwargs
