"""The tiny SigLIP both image adapters' demos write (Redux's vision tower file, the IP-Adapter's whole SiglipModel):
the real input (384x384 in patches of 14, 729 positions) at a small width with SigLIP's head width of 72 (the loader
infers the heads from it), under the real files' tensor names."""
from __future__ import annotations

from .weights import RandomWeights

SIGLIP = dict(
    hidden_size=144,         # 1152 (head width 72 as real: 2 heads, 16 real)
    intermediate_size=288,   # 4304
    num_hidden_layers=2,     # 27
    patch_size=14,           # 14
    positions=729,           # 729 = 27 x 27 patches of a 384x384 image
)


def siglip_layers(w: RandomWeights, prefix: str, c: dict = SIGLIP) -> None:
    """The encoder layers under ``<prefix>encoder.layers.<i>.``."""
    h, f = c["hidden_size"], c["intermediate_size"]
    for i in range(c["num_hidden_layers"]):
        layer = f"{prefix}encoder.layers.{i}."
        w.norm(layer + "layer_norm1.weight", h, layer + "layer_norm1.bias")
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            w.linear(layer + "self_attn." + proj, h, h)
        w.norm(layer + "layer_norm2.weight", h, layer + "layer_norm2.bias")
        w.linear(layer + "mlp.fc1", f, h)
        w.linear(layer + "mlp.fc2", h, f)


def siglip_vision(w: RandomWeights, c: dict = SIGLIP) -> None:
    """The vision tower, ``vision_model.*``: embeddings, layers, the last norm and the MAP pooling head (which the
    real files hold whether or not an adapter reads it)."""
    h, f, p = c["hidden_size"], c["intermediate_size"], c["patch_size"]
    v = "vision_model."
    w.normal(v + "embeddings.patch_embedding.weight", (h, 3, p, p), (3 * p * p) ** -0.5)
    w.normal(v + "embeddings.patch_embedding.bias", (h,), 0.05)
    w.normal(v + "embeddings.position_embedding.weight", (c["positions"], h), 0.5)
    siglip_layers(w, v, c)
    w.norm(v + "post_layernorm.weight", h, v + "post_layernorm.bias")
    w.normal(v + "head.probe", (1, 1, h), 1.0)
    w.normal(v + "head.attention.in_proj_weight", (3 * h, h), h ** -0.5)
    w.normal(v + "head.attention.in_proj_bias", (3 * h,), 0.05)
    w.linear(v + "head.attention.out_proj", h, h)
    w.norm(v + "head.layernorm.weight", h, v + "head.layernorm.bias")
    w.linear(v + "head.mlp.fc1", f, h)
    w.linear(v + "head.mlp.fc2", h, f)


__all__ = ["SIGLIP", "siglip_layers", "siglip_vision"]
