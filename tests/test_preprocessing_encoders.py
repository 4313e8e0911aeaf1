"""Encoders: input size / mean / std from timm's pretrained config, user overrides, foundation-model presets,
loading a published-style state dict through the CLI path, clear errors for models that cannot run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from preprocessing import synthetic
from preprocessing.cli import config_from_args, main
from preprocessing.config import ConfigError
from preprocessing.encoder_specs import EncoderError, resolve_spec
from preprocessing.encoders import build_encoder
from preprocessing.presets import IMAGENET_MEAN, IMAGENET_STD, PRESETS, Preset
from preprocessing.readers import open_slide
from preprocessing.stream import read_tile
from preprocessing.tiling import plan_tiles
from wsi_ncmi.data.bags import read_bag

TILES = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_fixed_input_size_comes_from_timm_config_not_the_name():
    vit = build_encoder("test_vit", "random", tile_size=32)  # fixed 160-px input, a name no prefix list knows
    assert vit.preprocess.size == 160 and vit.encode(TILES).shape == (2, vit.embed_dim)
    levit = build_encoder("levit_128s", "random", tile_size=32)
    assert levit.preprocess.size == 224 and levit.encode(TILES[:1]).shape == (1, 384)
    cnn = build_encoder("test_resnet", "random", tile_size=32)
    assert cnn.preprocess.size is None  # convolutional: tiles go in as they are


def test_a_model_that_cannot_take_the_input_raises_encoder_error():
    with pytest.raises(EncoderError, match=r"'test_vit'.*40x40"):
        build_encoder("test_vit", "random", input_size=40, tile_size=32)
    with pytest.raises(EncoderError, match="test_resnet.*cannot build"):
        build_encoder("test_resnet", "random", kwargs={"no_such_argument": 1})
    dyn = build_encoder("test_vit", "random", kwargs={"dynamic_img_size": True}, input_size=0, tile_size=32)
    assert dyn.preprocess.size is None and dyn.encode(TILES).shape[0] == 2


def test_mean_std_and_input_size_overrides_change_the_normalisation():
    plain = build_encoder("test_resnet", "random")
    assert plain.preprocess.mean.flatten().tolist() == pytest.approx([0.5 * 255] * 3)  # timm cfg of test_resnet
    over = build_encoder("test_resnet", "random", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), input_size=48)
    x = over.preprocess(TILES)
    assert x.shape == (2, 3, 48, 48) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert "mean=[0.0, 0.0, 0.0]" in over.normalization and "size=48" in over.normalization
    assert not torch.allclose(plain.encode(TILES), over.encode(TILES))
    with pytest.raises(EncoderError, match="--std"):
        resolve_spec("test_resnet", std=(1.0, 0.0, 1.0))


def test_uni_preset_is_the_published_architecture():
    spec = resolve_spec("uni")
    assert spec.arch == "vit_large_patch16_224" and spec.kwargs["init_values"] == 1e-5
    assert (spec.mean, spec.std, spec.input_size) == (IMAGENET_MEAN, IMAGENET_STD, 224)
    with torch.device("meta"):  # shapes only: no 300M-parameter allocation
        model = spec.make()
    sd = model.state_dict()
    assert model.num_features == PRESETS["uni"].embed_dim == 1024
    assert "blocks.0.ls1.gamma" in sd and tuple(sd["pos_embed"].shape) == (1, 197, 1024)
    assert not any(k.startswith("head.") and sd[k].numel() for k in sd)  # num_classes=0: UNI has no head


def _direct(model: torch.nn.Module, tiles: torch.Tensor, size: int) -> torch.Tensor:
    """The reference preprocessing written out: /255, resize (bilinear, antialias), ImageNet mean/std."""
    x = tiles.permute(0, 3, 1, 2).float() / 255.0
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.inference_mode():
        return model(x)


def test_preset_state_dict_loads_through_the_cli(tmp_path, monkeypatch):
    """A UNI-like preset (same recipe, tiny ViT): pytorch_model.bin -> --encoder NAME --weights FILE."""
    import timm

    kw = {"init_values": 1e-5, "dynamic_img_size": True}
    monkeypatch.setitem(PRESETS, "tiny_uni", Preset("test_vit", kw, 64, IMAGENET_MEAN, IMAGENET_STD,
                                                             64, "test"))
    torch.manual_seed(1)
    ref = timm.create_model("test_vit", pretrained=False, num_classes=0, **kw).eval()
    weights = tmp_path / "pytorch_model.bin"
    torch.save(ref.state_dict(), weights)
    rgb, _ = synthetic.synthetic_tissue(600, 800, seed=5, n_blobs=2, coverage=0.35)
    synthetic.write_svs(tmp_path / "in" / "s.svs", rgb, mpp=0.5, downsamples=(1, 4))
    out = tmp_path / "out"
    code = main(["--input", str(tmp_path / "in"), "--output", str(out), "--encoder", "tiny_uni", "--weights",
                 str(weights), "--target-mpp", "2", "--patch-size", "32", "--workers", "0", "--device", "cpu",
                 "--seg-mpp", "4", "--min-tissue", "0.5", "--features-dtype", "float32", "--no-progress"])
    assert code == 0
    bag = read_bag(out / "bags" / "s.h5")
    assert "mean=[0.485, 0.456, 0.406]" in bag.attrs["normalization"] and "size=64" in bag.attrs["normalization"]
    assert json.loads(bag.attrs["encoder_kwargs"])["init_values"] == 1e-5
    with open_slide(bag.attrs["source_path"]) as r:
        plan = plan_tiles(r.mpp, r.level_downsamples, 2.0, 32)
        rows = [0, len(bag.coords) - 1]
        tiles = torch.from_numpy(np.stack([read_tile(r, bag.coords[i], plan) for i in rows]))
    np.testing.assert_allclose(np.asarray(bag.features[rows]), _direct(ref, tiles, 64).numpy(), rtol=1e-4,
                               atol=1e-4)
    # another normalisation is another bag: the folder's settings include it (--overwrite takes the folder over)
    settings = json.loads(bag.attrs["settings_json"])
    assert settings["mean"] == list(IMAGENET_MEAN) and settings["input_size"] == 64
    code = main(["--input", str(tmp_path / "in"), "--output", str(out), "--encoder", "tiny_uni", "--weights",
                 str(weights), "--target-mpp", "2", "--patch-size", "32", "--workers", "0", "--device", "cpu",
                 "--seg-mpp", "4", "--min-tissue", "0.5", "--features-dtype", "float32", "--no-progress",
                 "--mean", "0.5", "0.5", "0.5", "--overwrite"])
    assert code == 0 and "mean=[0.5, 0.5, 0.5]" in read_bag(out / "bags" / "s.h5").attrs["normalization"]


def test_cli_parses_encoder_overrides(tmp_path):
    cfg, _ = config_from_args(["--input", "i", "--output", "o", "--encoder", "uni", "--encoder-kwargs",
                               '{"init_values": 1e-5}', "--mean", "0.1", "0.2", "0.3", "--std", "1", "1", "1",
                               "--input-size", "224"])
    assert cfg.encoder_kwargs_dict == {"init_values": 1e-5} and cfg.mean == [0.1, 0.2, 0.3]
    assert cfg.input_size == 224 and cfg.std == [1.0, 1.0, 1.0]
    with pytest.raises(ConfigError, match="encoder-kwargs"):
        config_from_args(["--input", "i", "--output", "o", "--encoder-kwargs", "{not json"])
    y = tmp_path / "c.yaml"
    y.write_text("encoder: uni\nencoder_kwargs: {init_values: 1.0e-5}\nmean: [0.4, 0.4, 0.4]\n")
    cfg, _ = config_from_args(["--config", str(y), "--input", "i", "--output", "o"])
    assert cfg.encoder_kwargs_dict == {"init_values": 1e-5} and cfg.mean == [0.4, 0.4, 0.4]
