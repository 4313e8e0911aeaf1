"""ResNet backbones from timm: CIFAR stem, feature dims, local weight files only."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from wsi_ncmi.natural.backbones import BackboneError, create_backbone, create_classifier, load_state_dict_file


def test_cifar_stem_resnet18_gives_pooled_512_features() -> None:
    torch.manual_seed(0)
    model, dim = create_backbone("resnet18", cifar_stem=True)
    assert dim == 512
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 512)


def test_imagenet_stem_is_kept_without_cifar_flag() -> None:
    model, dim = create_backbone("resnet18", cifar_stem=False, width=0.25)
    assert model.conv1.kernel_size == (7, 7) and isinstance(model.maxpool, nn.MaxPool2d)
    assert dim == 128


@pytest.mark.parametrize(("name", "dim"), [("resnet34", 512), ("resnet50", 2048), ("resnet101", 2048)])
def test_feature_dims(name: str, dim: int) -> None:
    _, d = create_backbone(name, width=0.125)  # narrow: construction is the point here
    assert d == int(dim * 0.125)


def test_unknown_backbone_is_rejected() -> None:
    with pytest.raises(BackboneError, match="resnet18"):
        create_backbone("vgg16")


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_weights_round_trip_from_local_file(tmp_path: Path, fmt: str) -> None:
    torch.manual_seed(1)
    src = create_classifier("resnet18", num_classes=5, cifar_stem=True, width=0.25)
    sd = {k: v.contiguous() for k, v in src.state_dict().items()}
    path = tmp_path / f"w.{fmt}"
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path))
    else:
        torch.save({"state_dict": sd}, path)
    backbone, _ = create_backbone("resnet18", cifar_stem=True, weights=str(path), width=0.25)  # fc ignored
    clf = create_classifier("resnet18", 5, cifar_stem=True, weights=str(path), width=0.25)
    x = torch.randn(2, 3, 16, 16)
    src.eval(), backbone.eval(), clf.eval()
    with torch.no_grad():
        assert torch.allclose(clf(x), src(x))
        assert torch.allclose(backbone(x), src.forward_head(src.forward_features(x), pre_logits=True))


def test_bad_weight_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(BackboneError, match="not found"):
        load_state_dict_file(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneError, match="cannot read"):
        load_state_dict_file(junk)
    other = tmp_path / "other.pt"
    torch.save({"conv1.weight": torch.zeros(1)}, other)
    with pytest.raises(BackboneError, match="do not match"):
        create_backbone("resnet18", weights=str(other))


def test_pickled_code_in_torch_file_is_not_executed(tmp_path: Path) -> None:
    import os

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    path = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, path)
    with pytest.raises(BackboneError):
        load_state_dict_file(path)
    assert not (tmp_path / "pwned").exists()
