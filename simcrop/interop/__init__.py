"""Weights in and out of other tools' layouts: pure state-dict conversions of simcrop's 3D ViT encoder
(simcrop.models.vit3d.ViT3DEncoder), no file formats and no command line (those are simcrop.pretrained and
simcrop.export).

    monai_vit   <-> monai.networks.nets.ViT (proj_type="conv", learnable position embedding, qkv_bias=True)
    timm_vit    <-> the SimCroP authors' downstream ViT (timm VisionTransformer naming, Conv3d patch embedding)
    common      the one-line shape/key check shared by both

Conventions and what each side assumes: docs/interop.md.
"""
