"""Which component a state dict is, and in which layout, told from its keys alone (never from the file name).

``detect_component(keys) -> (role, format, description)``. Roles the loader builds: ``dit``, ``vae``,
``text_encoder_1`` (CLIP-L), ``text_encoder_2`` (T5), and FLUX.1-Redux's ``flux_redux_image_encoder`` (a SigLIP
vision tower) and ``flux_redux_image_embedder``. Things that are recognised but are not loaded here get their own
role (``lora``, ``controlnet``, ``ip_adapter``, ``image_encoder``) so a misplaced file is named precisely; anything
else is ``unknown``. Descriptions read "a FLUX VAE (BFL ae layout)" etc., to be put after
"<file> holds ...".
"""
from __future__ import annotations

from collections.abc import Mapping

from ..redux.model import is_full_siglip, is_siglip_vision
from .errors import few

# prefixes some tools put in front of a whole component (ComfyUI / LDM-style single files)
DIT_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
VAE_PREFIXES = ("first_stage_model.", "vae.")
# tensors stored beside the Step1X-Edit DiT in one file; they belong to its connector, not to the DiT
SIDE_PREFIXES = ("connector.",)


def strip_common_prefix(keys, prefixes) -> str:
    """The prefix of ``prefixes`` that every key starts with, or ''."""
    keys = list(keys)
    for p in prefixes:
        if keys and all(k.startswith(p) for k in keys):
            return p
    return ""


def split_side_keys(keys) -> tuple[list[str], list[str]]:
    """(main keys, keys of a side component such as Step1X's ``connector.*``)."""
    main, side = [], []
    for k in keys:
        (side if k.startswith(SIDE_PREFIXES) else main).append(k)
    return main, side


def _shape(sd, key):
    try:
        return tuple(sd[key].shape)
    except Exception:
        return None


def _dit_hint(sd, img_in_key, guidance_present) -> str:
    shape = _shape(sd, img_in_key) if sd is not None else None
    bits = []
    if shape is not None and len(shape) == 2:
        bits.append({64: "", 384: "img_in 384 channels: Fill-type", 196: "img_in 196 channels: Flex.2-type"}.get(
            shape[1], f"img_in {shape[1]} channels"))
    if not guidance_present:
        bits.append("no guidance embedder: schnell-type")
    bits = [b for b in bits if b]
    return f"; {', '.join(bits)}" if bits else ""


def detect_component(keys) -> tuple[str, str, str]:
    """(role, format, description) of a state dict, from its keys (a mapping's shapes refine the description)."""
    sd = keys if isinstance(keys, Mapping) else None
    keys = list(keys.keys() if isinstance(keys, Mapping) else keys)
    from .quantized.read import is_aux_key  # here: the quantized package imports this module
    if any(is_aux_key(k) for k in keys):  # a 4-bit / scaled-fp8 file read raw: side tensors belong to their weight
        keys, sd = [k for k in keys if not is_aux_key(k)], None  # (and its shapes are packed bytes, not the model's)
    ks = set(keys)
    if not ks:
        return "unknown", "unknown", "no tensors at all"

    # LoRAs / adapters first: their keys embed the names of the model they patch
    if any(("lora_down" in k or "lora_up" in k or ".lora_A." in k or ".lora_B." in k or k.startswith("lora_unet_")
            or k.startswith("lora_te")) for k in ks):
        fmt = "kohya" if any("lora_down" in k or k.startswith("lora_unet_") for k in ks) else "peft"
        return "lora", fmt, f"a LoRA ({fmt} layout), not a full model"
    if any(k.startswith(("controlnet_blocks.", "controlnet_single_blocks.", "controlnet_x_embedder.")) for k in ks):
        return "controlnet", "diffusers", "a FLUX ControlNet (diffusers layout), not the base transformer"
    if any(k.startswith(("ip_adapter.", "image_proj.")) for k in ks) and not any("double_blocks." in k for k in ks):
        return "ip_adapter", "custom", "an IP-Adapter / image projection, not a base model component"
    if {"redux_up.weight", "redux_down.weight"} <= ks:
        return ("flux_redux_image_embedder", "diffusers",
                "the FLUX.1-Redux image embedder (image_embedder/diffusion_pytorch_model.safetensors)")

    # FLUX transformer, BFL layout (optionally prefixed; Step1X keeps its connector in the same file)
    main, side = split_side_keys(keys)
    p = strip_common_prefix(main, DIT_PREFIXES)
    m = {k[len(p):] for k in main}
    if {"img_in.weight", "txt_in.weight", "final_layer.linear.weight"} <= m and any(
            k.startswith(("double_blocks.", "single_blocks.")) for k in m):
        desc = "a FLUX transformer (DiT) (BFL layout" + _dit_hint(sd, p + "img_in.weight", any(
            k.startswith("guidance_in.") for k in m)) + ")"
        if side:
            desc += f" plus {len(side)} Step1X connector tensors (connector.*), which are not part of the DiT"
        return "dit", "bfl", desc
    # FLUX transformer, diffusers layout
    if {"x_embedder.weight", "context_embedder.weight", "proj_out.weight"} <= ks and any(
            k.startswith(("transformer_blocks.", "single_transformer_blocks.")) for k in ks):
        desc = "a FLUX transformer (DiT) (diffusers layout" + _dit_hint(sd, "x_embedder.weight", any(
            k.startswith("time_text_embed.guidance_embedder.") for k in ks)) + ")"
        return "dit", "diffusers", desc

    # VAE, BFL ae layout or diffusers layout
    p = strip_common_prefix(keys, VAE_PREFIXES)
    v = {k[len(p):] for k in keys}
    if {"encoder.conv_in.weight", "decoder.conv_in.weight"} <= v:
        latent = _shape(sd, p + "decoder.conv_in.weight") if sd is not None else None
        note = ""
        if latent is not None and len(latent) == 4 and latent[1] != 16:
            note = f", {latent[1]} latent channels: not the FLUX VAE, which has 16"
        if any(k.startswith("encoder.down.") for k in v):
            return "vae", "bfl", f"a FLUX VAE (BFL ae layout{note})"
        if any(k.startswith("encoder.down_blocks.") for k in v):
            return "vae", "diffusers", f"a FLUX VAE (diffusers layout{note})"

    # image and text encoders (transformers layouts). SigLIP and CLIP share key names (text_model.*, vision_model.*,
    # position_embedding): the SigLIP vision tower alone is Redux's image encoder; anything else with a vision
    # tower (a whole SigLIP or CLIP model, a CLIP vision tower) is never taken for CLIP-L.
    if is_siglip_vision(ks):
        return ("flux_redux_image_encoder", "transformers",
                "a SigLIP vision tower (the layout of FLUX.1-Redux's image_encoder/model.safetensors)")
    if is_full_siglip(ks):
        return ("image_encoder", "transformers", "a whole SigLIP model (text and vision towers, as "
                "google/siglip-so400m-patch14-384 ships it), not a FLUX text encoder nor FLUX.1-Redux's "
                "image_encoder (the vision tower alone)")
    if any(k.startswith("vision_model.") for k in ks):
        return "image_encoder", "transformers", "a CLIP/SigLIP vision model, not a FLUX text encoder"
    for pre in ("text_model.", ""):
        if {pre + "embeddings.token_embedding.weight", pre + "encoder.layers.0.self_attn.q_proj.weight"} <= ks:
            if pre + "head.weight" in ks:
                return "unknown", "transformers", "a SigLIP text model, not the CLIP-L text encoder"
            return "text_encoder_1", "transformers", "a CLIP text encoder (transformers layout)"
    if "encoder.block.0.layer.0.SelfAttention.q.weight" in ks and (
            "shared.weight" in ks or "encoder.embed_tokens.weight" in ks):
        return "text_encoder_2", "transformers", "a T5 encoder (transformers layout)"
    if any(k.startswith(("model.language_model.", "model.layers.", "visual.", "model.visual.")) for k in ks):
        return "unknown", "transformers", "a language/vision-language model (e.g. Qwen2.5-VL), not a FLUX component"
    return "unknown", "unknown", f"tensors this loader does not recognise (keys like {few(keys, 3)})"
