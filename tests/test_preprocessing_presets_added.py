"""The five presets of issue #24 (conch_v1, phikon_v2, midnight12k, hibou_l, lunit_vits8): their architectures
against the published ones (meta device), the CONCH v1 tower and converter against CONCH's pooler written out,
the transformers-5 key names and position-embedding resampling of ``hf_dinov2``, Lunit's timm keys, and the
listing. (Dims and parameter counts of every preset: tests/test_preprocessing_presets.py.)"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from preprocessing.cli import main
from preprocessing.encoder_specs import resolve_spec
from preprocessing.presets import CONVERTERS, PRESETS, ConchV1Tower, pool_model, resolve_kwargs

ADDED = ("conch_v1", "phikon_v2", "midnight12k", "hibou_l", "lunit_vits8")


def _meta(name: str) -> nn.Module:
    with torch.device("meta"):
        return resolve_spec(name).make()


def test_added_presets_match_the_published_architectures():
    conch = _meta("conch_v1")  # CONCH conch_ViT-B-16.json: ViT-B/16 at 448, pooler 512-d / 8 heads, kdim 768
    attn = conch.attn_pool_contrast.attn
    assert tuple(conch.trunk.pos_embed.shape) == (1, 1 + 28 * 28, 768) and len(conch.trunk.blocks) == 12
    assert attn.kdim == attn.vdim == 768 and attn.num_heads == 8 and tuple(attn.q_proj_weight.shape) == (512, 512)
    assert conch.attn_pool_contrast.query.shape == (1, 512) and isinstance(conch.trunk.blocks[0].ls1, nn.Identity)
    phikon = _meta("phikon_v2")  # DINOv2 ViT-L/16: LayerScale, GELU MLP, no registers
    assert phikon.patch_embed.patch_size == (16, 16) and len(phikon.blocks) == 24 and phikon.num_prefix_tokens == 1
    assert phikon.blocks[0].ls1.gamma.shape == (1024,) and phikon.blocks[0].mlp.fc1.out_features == 4096
    midnight = _meta("midnight12k")  # DINOv2 ViT-g/14: SwiGLU of (int(6144 * 2 / 3) + 7) // 8 * 8 = 4096
    assert len(midnight.blocks) == 40 and midnight.num_prefix_tokens == 1 and midnight.embed_dim == 1536
    assert midnight.blocks[0].mlp.fc1.out_features == 2 * 4096 and isinstance(midnight.blocks[0].mlp.act, nn.SiLU)
    hibou = _meta("hibou_l")  # Hibou: ViT-L/14, 4 registers, SwiGLU of (int(4096 * 2 / 3) + 7) // 8 * 8 = 2736
    assert hibou.num_prefix_tokens == 5 and hibou.no_embed_class and hibou.blocks[0].mlp.fc1.out_features == 2 * 2736
    assert tuple(hibou.pos_embed.shape) == (1, 256, 1024) and type(hibou.blocks[0].mlp).__name__ == "GluMlp"
    lunit = _meta("lunit_vits8")
    assert lunit.patch_embed.patch_size == (8, 8) and lunit.embed_dim == 384 and len(lunit.blocks) == 12
    assert PRESETS["lunit_vits8"].mean == (0.70322989, 0.53606487, 0.66096631)
    assert PRESETS["hibou_l"].std == (0.195, 0.2316, 0.1816) and PRESETS["midnight12k"].mean == (0.5, 0.5, 0.5)
    assert resolve_spec("midnight12k").preprocessing() == {
        "preset": "midnight12k", "pooling": "cls_mean", "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
        "input_size": 224, "resize": 224, "crop": 224, "interpolation": "bilinear"}
    assert resolve_spec("conch_v1").preprocessing()["interpolation"] == "bicubic"


def test_list_encoders_json_lists_the_added_presets_with_their_sources(capsys):
    assert main(["--list-encoders", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["presets"]}
    assert {n: rows[n]["embed_dim"] for n in ADDED} == {"conch_v1": 512, "phikon_v2": 1024, "midnight12k": 3072,
                                                         "hibou_l": 1024, "lunit_vits8": 384}
    assert all("@" in rows[n]["source"] for n in ADDED)  # every source names a commit / revision
    assert "config.json was not read" in rows["phikon_v2"]["note"] and rows["conch_v1"]["note"] == ""


# ------------------------------------------------------------------------------------------------- CONCH v1
def _conch_pool_reference(p: dict[str, torch.Tensor], x: torch.Tensor, heads: int) -> torch.Tensor:
    """CONCH v1's AttentionalPooler + ln_contrast written out (transformer.py / vision_tower.py @141cc09)."""
    def ln(t, pre):
        return nn.functional.layer_norm(t, t.shape[-1:], p[f"{pre}.weight"], p[f"{pre}.bias"])

    wb = p["attn_pool_contrast.attn.in_proj_bias"].chunk(3)
    q = ln(p["attn_pool_contrast.query"], "attn_pool_contrast.ln_q") @ p["attn_pool_contrast.attn.q_proj_weight"].T
    kx = ln(x, "attn_pool_contrast.ln_k")  # [B, N, C]
    k = kx @ p["attn_pool_contrast.attn.k_proj_weight"].T + wb[1]
    v = kx @ p["attn_pool_contrast.attn.v_proj_weight"].T + wb[2]
    q = q + wb[0]  # [1, D]
    b, d = x.shape[0], q.shape[-1] // heads
    qh = q.reshape(1, heads, d).permute(1, 0, 2)  # [h, 1, d]
    kh, vh = (z.reshape(b, -1, heads, d).permute(0, 2, 1, 3) for z in (k, v))  # [B, h, N, d]
    att = torch.einsum("hqd,bhnd->bhqn", qh * d ** -0.5, kh).softmax(-1)
    out = torch.einsum("bhqn,bhnd->bqhd", att, vh).reshape(b, heads * d)
    out = out @ p["attn_pool_contrast.attn.out_proj.weight"].T + p["attn_pool_contrast.attn.out_proj.bias"]
    return ln(out, "ln_contrast")


def test_conch_v1_converter_keeps_the_vision_tower_and_matches_the_reference_pooler():
    torch.manual_seed(0)
    small = {"embed_dim": 32, "depth": 1, "num_heads": 2, "img_size": 32, "dynamic_img_size": True}
    tower = ConchV1Tower("vit_base_patch16_224", pool_dim=16, pool_heads=2, **small).eval()
    gen = torch.Generator().manual_seed(4)
    own = {k: torch.randn(v.shape, generator=gen) * 0.2 for k, v in tower.state_dict().items()}
    released = {f"visual.{k}": v for k, v in own.items()}  # the CoCa checkpoint's names, with the parts not used
    released.update({"visual.attn_pool_caption.query": torch.zeros(256, 32), "visual.ln_caption.weight": torch.ones(32),
                     "visual.proj_contrast": torch.zeros(16, 16), "text.token_embedding.weight": torch.zeros(8, 4),
                     "logit_scale": torch.tensor(2.0)})
    fresh = ConchV1Tower("vit_base_patch16_224", pool_dim=16, pool_heads=2, **small).eval()
    fresh.load_state_dict(CONVERTERS["conch_v1"](released, fresh), strict=True)
    x = torch.randn(2, 3, 32, 32, generator=gen)
    with torch.inference_mode():
        tokens = fresh.trunk.forward_features(x)  # [B, T, C]
        torch.testing.assert_close(fresh(x), _conch_pool_reference(own, tokens, heads=2), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------- hf_dinov2
def _tiny(arch: str = "vit_large_patch14_reg4_dinov2", **kw) -> nn.Module:
    import timm

    torch.manual_seed(0)
    base = {"img_size": 28, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 4.0,
            **resolve_kwargs({"mlp_layer": "timm.layers.SwiGLUPacked", "act_layer": "torch.nn.SiLU"})}
    return timm.create_model(arch, pretrained=False, num_classes=0, **{**base, **kw}).eval()


def test_hf_dinov2_reads_transformers_5_names_with_registers_and_swiglu():
    ref = _tiny()
    with torch.no_grad():
        ref.cls_token.copy_(torch.round(ref.cls_token * 64) / 64)
    own = ref.state_dict()
    p0 = torch.round(torch.randn(1, 1, 32) * 64) / 64  # dyadic: the class position folds back exactly
    sd = {"embeddings.cls_token": own["cls_token"] - p0, "embeddings.mask_token": torch.zeros(1, 32),
          "embeddings.position_embeddings": torch.cat([p0, own["pos_embed"]], dim=1),
          "embeddings.register_tokens": own["reg_token"], "layernorm.weight": own["norm.weight"],
          "layernorm.bias": own["norm.bias"],
          "embeddings.patch_embeddings.projection.weight": own["patch_embed.proj.weight"],
          "embeddings.patch_embeddings.projection.bias": own["patch_embed.proj.bias"]}
    names = {"norm1": "norm1", "norm2": "norm2", "attn.proj": "attention.o_proj", "mlp.fc2": "mlp.down_proj",
             "ls1.gamma": "layer_scale1.lambda1", "ls2.gamma": "layer_scale2.lambda1"}
    for i in range(2):
        for leaf in ("weight", "bias"):
            for n, t in zip(("q_proj", "k_proj", "v_proj"), own[f"blocks.{i}.attn.qkv.{leaf}"].chunk(3)):
                sd[f"encoder.layer.{i}.attention.{n}.{leaf}"] = t
            gate, up = own[f"blocks.{i}.mlp.fc1.{leaf}"].chunk(2)
            sd[f"encoder.layer.{i}.mlp.gate_proj.{leaf}"], sd[f"encoder.layer.{i}.mlp.up_proj.{leaf}"] = gate, up
        for t_name, h_name in names.items():
            for leaf in (("",) if "gamma" in t_name else (".weight", ".bias")):
                sd[f"encoder.layer.{i}.{h_name}{leaf}"] = own[f"blocks.{i}.{t_name}{leaf}"]
    fresh = _tiny()
    fresh.load_state_dict(CONVERTERS["hf_dinov2"](sd, fresh), strict=True)
    x = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        torch.testing.assert_close(fresh.forward_features(x), ref.forward_features(x), rtol=0, atol=0)


@pytest.mark.parametrize("registers", [False, True])
def test_hf_dinov2_resamples_a_position_embedding_saved_at_another_grid(registers):
    """transformers' Dinov2 (with registers) interpolate_pos_encoding: bicubic to the target grid in float32,
    align_corners False, antialiased only with registers; the class position is left as it is."""
    kw = {"reg_tokens": 4, "no_embed_class": True} if registers else {"reg_tokens": 0, "no_embed_class": False}
    model = _tiny(**kw)  # 28 px / patch 14: a 2x2 grid
    pos = torch.randn(1, 1 + 5 * 5, 32, generator=torch.Generator().manual_seed(2))  # saved at 5x5 (70 px)
    sd = {"embeddings.cls_token": torch.zeros(1, 1, 32), "embeddings.position_embeddings": pos}
    if registers:
        sd["embeddings.register_tokens"] = torch.zeros(1, 4, 32)
    out = CONVERTERS["hf_dinov2"](sd, model)
    grid = nn.functional.interpolate(pos[:, 1:].reshape(1, 5, 5, 32).permute(0, 3, 1, 2), size=(2, 2),
                                     mode="bicubic", align_corners=False, antialias=registers)
    want = grid.permute(0, 2, 3, 1).reshape(1, 4, 32)
    got = out["pos_embed"] if registers else out["pos_embed"][:, 1:]
    torch.testing.assert_close(got, want)
    cls = out["cls_token"] if registers else out["pos_embed"][:, :1]  # folded into the token / kept first
    torch.testing.assert_close(cls, pos[:, :1])
    same = {"embeddings.cls_token": torch.zeros(1, 1, 32), "embeddings.position_embeddings": pos[:, :5]}
    kept = CONVERTERS["hf_dinov2"](same, _tiny(reg_tokens=0, no_embed_class=False))["pos_embed"]
    assert torch.equal(kept, pos[:, :5])  # the grids agree (2x2): left as saved


# ---------------------------------------------------------------------------------------------------- Lunit
def test_lunit_release_keys_are_timm_keys():
    """Lunit's README builds timm VisionTransformer(img_size=224, patch_size=8, embed_dim=384, num_heads=6,
    num_classes=0) and loads dino_vit_small_patch8_ep200.torch strictly: the preset needs no converter."""
    from timm.models.vision_transformer import VisionTransformer

    with torch.device("meta"):
        readme = VisionTransformer(img_size=224, patch_size=8, embed_dim=384, num_heads=6, num_classes=0)
        mine = pool_model(_meta("lunit_vits8"), "cls")
    theirs = {k: tuple(v.shape) for k, v in readme.state_dict().items()}
    assert theirs == {k: tuple(v.shape) for k, v in mine.trunk.state_dict().items()}
    assert PRESETS["lunit_vits8"].converter is None
