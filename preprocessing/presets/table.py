"""The preset table: every published encoder's recipe, each with the public source it was checked against.

Rows name their builder (:data:`preprocessing.presets.towers.BUILDERS`) and converter
(:data:`preprocessing.presets.converters.CONVERTERS`); a recipe field the named sources leave open is said so
in the row's ``note``. Importing this module registers the rows in :data:`PRESETS`.
"""

from __future__ import annotations

from .recipe import (
    HIBOU_MEAN,
    HIBOU_STD,
    HOPTIMUS_MEAN,
    HOPTIMUS_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    KAIKO_MEAN,
    KAIKO_STD,
    LUNIT_MEAN,
    LUNIT_STD,
    Preset,
    register_preset,
)

__all__: list[str] = []

_SWIGLU = {"mlp_layer": "timm.layers.SwiGLUPacked", "act_layer": "torch.nn.SiLU"}
_TRIDENT = "mahmoodlab/TRIDENT trident/patch_encoder_models/load.py @a91fa84"
_TRIDENT_TABLE = "mahmoodlab/TRIDENT README patch-encoder table @a91fa84"

register_preset("uni", Preset(
    "vit_large_patch16_224", {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True},
    224, IMAGENET_MEAN, IMAGENET_STD, 1024,
    f"huggingface.co/MahmoodLab/UNI card; {_TRIDENT} (UNIInferenceEncoder); mahmoodlab/CLAM models/builder.py; "
    f"{_TRIDENT_TABLE} (256 px, 20x)",
    pooling="cls", resize=224, interpolation="bilinear", precision="fp16", tile_px=256, mpp=0.5,
    params=303_350_784, license="CC-BY-NC-ND-4.0, gated (MahmoodLab/UNI on Hugging Face)"))
register_preset("uni2_h", Preset(
    "vit_giant_patch14_224",
    {"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5, "embed_dim": 1536,
     "mlp_ratio": 2.66667 * 2, "no_embed_class": True, "reg_tokens": 8, "dynamic_img_size": True, **_SWIGLU},
    224, IMAGENET_MEAN, IMAGENET_STD, 1536,
    f"huggingface.co/MahmoodLab/UNI2-h card; {_TRIDENT} (UNIv2InferenceEncoder); {_TRIDENT_TABLE} (256 px, 20x)",
    pooling="cls", resize=224, interpolation="bilinear", precision="bf16", tile_px=256, mpp=0.5,
    params=681_394_176, license="CC-BY-NC-ND-4.0, gated (MahmoodLab/UNI2-h on Hugging Face)"))

_VIRCHOW = {"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, "dynamic_img_size": True, **_SWIGLU}
for _name, _kw, _pool, _dim, _params, _card in (
        ("virchow", _VIRCHOW, "cls_mean", 2560, 631_229_184, "paige-ai/Virchow"),
        ("virchow_cls", _VIRCHOW, "cls", 1280, 631_229_184, "paige-ai/Virchow"),
        ("virchow2", {**_VIRCHOW, "reg_tokens": 4}, "cls_mean", 2560, 631_239_424, "paige-ai/Virchow2"),
        ("virchow2_cls", {**_VIRCHOW, "reg_tokens": 4}, "cls", 1280, 631_239_424, "paige-ai/Virchow2")):
    register_preset(_name, Preset(
        "vit_huge_patch14_224", dict(_kw), 224, IMAGENET_MEAN, IMAGENET_STD, _dim,
        f"huggingface.co/{_card} card; {_TRIDENT} (Virchow/Virchow2InferenceEncoder: class token ⊕ mean of the "
        f"patch tokens after the {1 + _kw.get('reg_tokens', 0)} prefix tokens); {_TRIDENT_TABLE} (224 px, 20x)",
        pooling=_pool, resize=None, interpolation="bicubic", precision="fp16", tile_px=224, mpp=0.5,
        params=_params, license=f"gated; licence as stated on the {_card} card"))

register_preset("gigapath", Preset(
    "vit_giant_patch14_dinov2",
    {"img_size": 224, "in_chans": 3, "patch_size": 16, "embed_dim": 1536, "depth": 40, "num_heads": 24,
     "mlp_ratio": 5.33334, "dynamic_img_size": True},
    224, IMAGENET_MEAN, IMAGENET_STD, 1536,
    f"huggingface.co/prov-gigapath/prov-gigapath card (resize 256 bicubic + center crop 224); {_TRIDENT} "
    f"(GigaPathInferenceEncoder); {_TRIDENT_TABLE} (256 px, 20x). SwiGLUPacked/SiLU and init_values 1e-5 come "
    "from timm's vit_giant_patch14_dinov2 defaults",
    pooling="cls", resize=256, interpolation="bicubic", precision="fp16", tile_px=256, mpp=0.5,
    params=1_134_953_984, license="Apache-2.0 with gated access (prov-gigapath/prov-gigapath on Hugging Face)"))
for _name, _card in (("hoptimus0", "bioptimus/H-optimus-0"), ("hoptimus1", "bioptimus/H-optimus-1")):
    register_preset(_name, Preset(
        "vit_giant_patch14_reg4_dinov2", {"img_size": 224, "init_values": 1e-5, "dynamic_img_size": True},
        224, HOPTIMUS_MEAN, HOPTIMUS_STD, 1536,
        f"huggingface.co/{_card} card (224 px at 0.5 µm/px, its mean/std); {_TRIDENT} (HOptimus0/1InferenceEncoder)",
        pooling="cls", resize=None, interpolation="bilinear", precision="fp16", tile_px=224, mpp=0.5,
        params=1_134_774_272,
        license="Apache-2.0 (bioptimus/H-optimus-0 on Hugging Face)" if _name == "hoptimus0"
        else "gated; licence as stated on the bioptimus/H-optimus-1 card"))
register_preset("gpfm", Preset(
    "vit_large_patch14_dinov2", {"img_size": 224, "init_values": 1e-5, "dynamic_img_size": True},
    224, IMAGENET_MEAN, IMAGENET_STD, 1024,
    f"huggingface.co/majiabo/GPFM; {_TRIDENT} (GPFMInferenceEncoder: GPFM.pth loads strictly into this timm "
    f"model; resize 224 bicubic); {_TRIDENT_TABLE} (224 px, 20x)",
    pooling="cls", resize=None, interpolation="bicubic", precision="fp16", tile_px=224, mpp=0.5,
    converter="dinov2_teacher", params=303_227_904, license="licence as stated on the majiabo/GPFM card"))
register_preset("conch_v15", Preset(
    "vit_large_patch16_224",
    {"img_size": 448, "init_values": 1.0, "pool_dim": 768, "pool_heads": 8, "base_grid": 14},
    448, IMAGENET_MEAN, IMAGENET_STD, 768,
    f"huggingface.co/MahmoodLab/conchv1_5; {_TRIDENT} + model_zoo/conchv1_5/conchv1_5.py (ViT-L/16 trunk with "
    "LayerScale 1.0, attentional pooler 768-d / 8 heads / 1 query, LayerNorm; resize 448 bilinear + crop 448; "
    f"position embedding interpolated DINO-style at run time); {_TRIDENT_TABLE} (512 px, 20x)",
    pooling="model", resize=448, interpolation="bilinear", precision="fp16", tile_px=512, mpp=0.5,
    converter="conch_v15", builder="conch_v15", params=306_711_296,  # pos_embed held at 28x28
    license="CC-BY-NC-ND-4.0, gated (MahmoodLab/conchv1_5 on Hugging Face)"))
for _name, _arch, _img, _patch, _dim, _params in (
        ("kaiko_s16", "vit_small_patch16_224", 224, 16, 384, 21_665_664),
        ("kaiko_s8", "vit_small_patch8_224", 224, 8, 384, 21_670_272),
        ("kaiko_b16", "vit_base_patch16_224", 224, 16, 768, 85_798_656),
        ("kaiko_b8", "vit_base_patch8_224", 224, 8, 768, 85_807_872),
        ("kaiko_l14", "vit_large_patch14_reg4_dinov2", 518, 14, 1024, 304_370_688)):
    register_preset(_name, Preset(
        _arch, {"img_size": _img, "dynamic_img_size": True}, 224, KAIKO_MEAN, KAIKO_STD, _dim,
        f"kaiko-ai/towards_large_pathology_fms (hf-hub:1aurent/{_arch}.kaiko_ai_towards_large_pathology_fms); "
        f"{_TRIDENT} (Kaiko*InferenceEncoder: built at {_img} px, fed 224 px, resize 224 bilinear + crop 224, "
        f"mean/std 0.5); kaiko-ai/eva pathology backbones; {_TRIDENT_TABLE} (256 px, 20x)",
        pooling="cls", resize=224, interpolation="bilinear", precision="fp32", tile_px=256, mpp=0.5,
        params=_params, license="licence as stated in kaiko-ai/towards_large_pathology_fms"))
register_preset("phikon", Preset(
    "vit_base_patch16_224",
    {"img_size": 224, "norm_layer": {"callable": "torch.nn.LayerNorm", "eps": 1e-12}},
    224, IMAGENET_MEAN, IMAGENET_STD, 768,
    "huggingface.co/owkin/phikon config.json (ViTModel: ViT-B/16, 224 px, qkv bias, layer_norm_eps 1e-12); "
    f"{_TRIDENT} (PhikonInferenceEncoder: class token of last_hidden_state, resize 224 bilinear); "
    f"{_TRIDENT_TABLE} (224 px, 20x)",
    pooling="cls", resize=None, interpolation="bilinear", precision="fp32", tile_px=224, mpp=0.5,
    converter="hf_vit", params=85_798_656, license="licence as stated on the owkin/phikon card"))

# ------------------------------------------------------------------------- CONCH v1, Phikon-v2, Midnight, Hibou, Lunit
_CONCH = "mahmoodlab/CONCH @141cc09"
register_preset("conch_v1", Preset(
    "vit_base_patch16_224", {"img_size": 448, "dynamic_img_size": True, "pool_dim": 512, "pool_heads": 8},
    448, IMAGENET_MEAN, IMAGENET_STD, 512,
    f"{_CONCH}: open_clip_custom/model_configs/conch_ViT-B-16.json (embed_dim 512, image_size 448, patch 16, "
    "attentional pooler 8 heads / 1 contrast query), coca_model.py (timm VisionTransformer 768-d, 12 blocks, "
    "12 heads, mlp_ratio 4, dynamic_img_size), vision_tower.py + transformer.py (forward_no_head: "
    "nn.MultiheadAttention pooler with kdim = vdim = 768, then ln_contrast), transform.py (Resize 448 bicubic + "
    "CenterCrop 448, ImageNet mean/std), README (encode_image(proj_contrast=False, normalize=False) for MIL); "
    f"{_TRIDENT} (Conchv1InferenceEncoder: the same call, fp32); {_TRIDENT_TABLE} (512-d, 512 px, 20x)",
    pooling="model", resize=448, interpolation="bicubic", precision="fp32", tile_px=512, mpp=0.5,
    converter="conch_v1", builder="conch_v1", params=87_567_104,
    license="CC-BY-NC-ND-4.0, gated (MahmoodLab/CONCH on Hugging Face)"))
register_preset("phikon_v2", Preset(
    "vit_large_patch16_224", {"img_size": 224, "init_values": 1e-5, "dynamic_img_size": True},
    224, IMAGENET_MEAN, IMAGENET_STD, 1024,
    "huggingface.co/owkin/phikon-v2 card @e5af21c (ViT-L/16 trained with DINOv2, transformers AutoModel, class "
    f"token of last_hidden_state; 20x tiles); {_TRIDENT} (Phikonv2InferenceEncoder: Resize 224 + CenterCrop 224 "
    f"with torchvision's default bilinear, ImageNet mean/std, fp32); {_TRIDENT_TABLE} (1024-d, 224 px, 20x)",
    pooling="cls", resize=224, interpolation="bilinear", precision="fp32", tile_px=224, mpp=0.5,
    converter="hf_dinov2", params=303_350_784, license="Owkin non-commercial licence (owkin/phikon-v2 card)",
    note="phikon-v2's config.json was not read: GELU MLP (mlp_ratio 4), no registers and LayerNorm eps 1e-6 are "
         "DINOv2 ViT-L's defaults (no registers also per wsistream's Phikon-v2 recipe page); a file with SwiGLU or "
         "registers fails the shape check. A position embedding saved at another grid is resampled to 14x14 on "
         "loading, as transformers does at run time"))
register_preset("midnight12k", Preset(
    "vit_giant_patch14_dinov2", {"img_size": 224, "dynamic_img_size": True},
    224, KAIKO_MEAN, KAIKO_STD, 3072,
    "kaiko-ai/Midnight README @e48dce1 (the huggingface.co/kaiko-ai/midnight card: Midnight-12k, DINOv2 from "
    "facebook/dinov2-giant, transformers AutoModel; 224x224 inputs, v2.Resize(224) + CenterCrop(224), mean/std "
    "0.5; classification embedding = class token ⊕ mean of last_hidden_state[:, 1:], whose 16x16 = 256 patch "
    "tokens leave no room for registers); huggingface.co/facebook/dinov2-giant config.json @cae9b8e (1536-d, 40 blocks, "
    f"24 heads, patch 14, SwiGLU, LayerScale); {_TRIDENT} (Midnight12kInferenceEncoder: same transforms, fp16); "
    f"{_TRIDENT_TABLE} (3072-d, 224 px, 20x)",
    pooling="cls_mean", resize=224, interpolation="bilinear", precision="fp16", tile_px=224, mpp=0.5,
    converter="hf_dinov2", params=1_134_769_664, license="MIT (kaiko-ai/midnight card)",
    note="kaiko-ai/midnight's own config.json was not read (the architecture is its base model's, "
         "facebook/dinov2-giant): a position embedding saved at another grid is resampled to 16x16 on loading, "
         "as transformers does at run time"))
register_preset("hibou_l", Preset(
    "vit_large_patch14_reg4_dinov2", {"img_size": 224, "mlp_ratio": 5.34375, "dynamic_img_size": True, **_SWIGLU},
    224, HIBOU_MEAN, HIBOU_STD, 1024,
    "HistAI/hibou @c453bbe (hibou/models: build_model = patch 14, LayerScale, SwiGLU 'swiglufused' of hidden "
    "(int(4 * 1024 * 2 / 3) + 7) // 8 * 8 = 2736, 4 registers, 224 px; vit_large = 1024-d, 24 blocks, 16 heads; "
    "example.ipynb: Resize 224 bicubic + CenterCrop 224, Hibou mean/std, features = pooler_output = class token; "
    "README: Hibou-L under Apache-2.0); huggingface.co/histai/hibou-L card (DINOv2 with registers through "
    "trust_remote_code, 304M parameters) and histai/hibou-b config.json @5cc6343 (Dinov2ModelWithRegisters, "
    f"use_swiglu_ffn, num_register_tokens 4, image_size 224); {_TRIDENT} (HibouLInferenceEncoder: pooler_output, "
    f"Resize 224 bicubic, fp32); {_TRIDENT_TABLE} (1024-d, 224 px, 20x)",
    pooling="cls", resize=None, interpolation="bicubic", precision="fp32", tile_px=224, mpp=0.5,
    converter="hf_dinov2", params=303_657_216, license="Apache-2.0, gated (histai/hibou-L on Hugging Face)",
    note="hibou-L's own config.json and remote modeling code were not read (hibou-b's config and the HistAI/hibou "
         "code were): the register tokens are taken to be stored as embeddings.register_tokens, as in "
         "transformers' Dinov2WithRegisters"))
register_preset("lunit_vits8", Preset(
    "vit_small_patch8_224", {"img_size": 224, "dynamic_img_size": True},
    224, LUNIT_MEAN, LUNIT_STD, 384,
    "lunit-io/benchmark-ssl-pathology README @1d3fd2a (timm VisionTransformer(img_size=224, patch_size=8, "
    "embed_dim=384, num_heads=6, num_classes=0) loads dino_vit_small_patch8_ep200.torch strictly: timm key "
    "names, no converter); kaiko-ai/eva @73b61a7 backbones/pathology/lunit.py (the training mean/std); "
    f"{_TRIDENT} (LunitS8InferenceEncoder: vit_small_patch8_224 class token, fp32); {_TRIDENT_TABLE} "
    "(384-d, 224 px, 20x)",
    pooling="cls", resize=None, interpolation="bilinear", precision="fp32", tile_px=224, mpp=0.5,
    params=21_670_272, license="Lunit non-commercial licence (lunit-io/benchmark-ssl-pathology LICENSE)",
    note="the authors publish no inference resize: 224-px tiles go in as they are; the interpolation used for "
         "other tile sizes is not from a source"))
