"""What a ControlNet file is, and the ``FluxControlNetModel`` its tensor shapes describe.

``classify(keys)`` -> (kind, description): ``"flux"`` for a FLUX.1 ControlNet in diffusers' ``FluxControlNetModel``
layout (the InstantX, jasperai and alimama files), or the kind of a ControlNet this engine cannot run (another base
model's, or FLUX's in another layout), described for an error message. ``looks_like_controlnet(keys)`` says whether
a file is any ControlNet at all, so a misplaced one is named as such instead of "unknown tensors".

``infer_controlnet_config(sd)`` reads the architecture from the shapes, never from config.json:

- hidden = rows of ``x_embedder``; in_channels = its columns (64: packed 2x2 latents)
- control features = columns of ``controlnet_x_embedder``: 64 (a VAE-encoded control image) or 68 (alimama
  Inpainting-Beta: the masked image's latents plus the mask, 4 per token); the diffusers class cannot say 68, so
  ``build_controlnet`` widens that one layer
- head width = length of ``norm_q``; heads = hidden / head width; rotary axes as the FLUX transformer's
- num_layers / num_single_layers = double / single blocks (Union-alpha 5 + 10, Upscaler 5 + 0, Inpainting 6 + 0)
- joint_attention_dim = columns of ``context_embedder``; pooled_projection_dim = of ``text_embedder.linear_1``
- guidance_embeds = presence of ``guidance_embedder``; num_mode = rows of ``controlnet_mode_embedder`` (Union)
"""
from __future__ import annotations

from ..loading.errors import ModelFileError, few
from ..loading.transformer import block_indices, rope_axes

SUPPORTED = ("a FLUX.1 ControlNet in diffusers' FluxControlNetModel layout (InstantX FLUX.1-dev-Controlnet-Union-alpha, "
             "jasperai Flux.1-dev-Controlnet-Upscaler or alimama FLUX.1-dev-Controlnet-Inpainting-Beta: "
             "diffusion_pytorch_model.safetensors)")
MASK_FEATURES = 4   # the mask's 2x2 latent cells per token, after the 64 image features (alimama)

_FLUX_KEYS = {"x_embedder.weight", "controlnet_x_embedder.weight", "context_embedder.weight",
              "time_text_embed.timestep_embedder.linear_1.weight"}
_CONTROLNET_PREFIXES = ("controlnet_blocks.", "controlnet_single_blocks.", "controlnet_x_embedder.",
                        "controlnet_cond_embedding.", "controlnet_down_blocks.", "controlnet_mid_block.",
                        "control_model.", "pos_embed_input.")


def _keys(sd) -> set:
    return set(sd.keys() if hasattr(sd, "keys") else sd)


def looks_like_controlnet(keys) -> bool:
    """Any ControlNet (FLUX, SD3, SD 1.x / SDXL, XLabs, LDM ``control_model.``), by its keys."""
    ks = _keys(keys)
    if any(k.startswith(_CONTROLNET_PREFIXES) for k in ks):
        return True
    return any(k.startswith("input_hint_block.") for k in ks) and any(k.startswith("zero_convs.") for k in ks)


def classify(keys) -> tuple[str, str]:
    """(kind, description) of a ControlNet's key set; kind "flux" is the one this engine runs."""
    ks = _keys(keys)
    if any(k.startswith(("controlnet_cond_embedding.", "controlnet_down_blocks.", "controlnet_mid_block.")) for k in ks):
        sdxl = any(k.startswith("add_embedding.") for k in ks)
        return ("sdxl" if sdxl else "sd"), (f"a Stable Diffusion {'XL' if sdxl else '1.x/2.x'} ControlNet (UNet, "
                                            f"diffusers layout), made for another base model than FLUX.1")
    if any(k.startswith("control_model.") for k in ks) or any(k.startswith("zero_convs.") for k in ks):
        return "sd", "a Stable Diffusion ControlNet (UNet, original LDM layout), made for another base model than FLUX.1"
    if any(k.startswith(("pos_embed.proj.", "pos_embed_input.proj.")) for k in ks):
        return "sd3", "an SD3 ControlNet (SD3ControlNetModel), made for Stable Diffusion 3, not FLUX.1"
    if any(k.startswith(("double_blocks.", "single_blocks.")) for k in ks) or "img_in.weight" in ks:
        return "flux-bfl", ("a FLUX ControlNet in the BFL/XLabs layout (double_blocks.*, input_hint_block), which this "
                            "engine does not run")
    if any(k.startswith("input_hint_block.") for k in ks):
        return "flux-hint", ("a FLUX ControlNet with a pixel-space hint encoder (input_hint_block: XLabs-style), which "
                             "this engine does not run")
    if _FLUX_KEYS <= ks:
        return "flux", "a FLUX.1 ControlNet (diffusers FluxControlNetModel layout)"
    return "unknown", f"a ControlNet this engine does not recognise (keys like {few(sorted(ks), 3)})"


def _get(sd, key):
    try:
        return sd[key]
    except KeyError:
        raise ModelFileError(f"the ControlNet lacks {key!r}: the file is incomplete.") from None


def infer_controlnet_config(sd) -> dict:
    """{"kwargs": FluxControlNetModel(**kwargs), "cond_channels": control features per token} from the shapes."""
    hidden, in_ch = _get(sd, "x_embedder.weight").shape
    cond_rows, cond = _get(sd, "controlnet_x_embedder.weight").shape
    doubles = block_indices(sd, "transformer_blocks.")
    singles = block_indices(sd, "single_transformer_blocks.")
    if not doubles and not singles:
        raise ModelFileError("the ControlNet has no transformer blocks at all: the file is incomplete.")
    norm = "transformer_blocks.0.attn.norm_q.weight" if doubles else "single_transformer_blocks.0.attn.norm_q.weight"
    head_dim = _get(sd, norm).shape[0]
    if hidden % head_dim:
        raise ModelFileError(f"ControlNet width {hidden} is not a multiple of its head width {head_dim}.")
    if cond_rows != hidden:
        raise ModelFileError(f"controlnet_x_embedder.weight has {cond_rows} rows, but the ControlNet is {hidden} wide.")
    if cond not in (in_ch, in_ch + MASK_FEATURES):
        raise ModelFileError(f"controlnet_x_embedder.weight takes {cond} features per token; a FLUX ControlNet takes "
                             f"{in_ch} (an encoded control image) or {in_ch + MASK_FEATURES} (image and mask).")
    for name, want in (("controlnet_blocks.", len(doubles)), ("controlnet_single_blocks.", len(singles))):
        have = len(block_indices(sd, name))
        if have != want:
            raise ModelFileError(f"the ControlNet has {want} {'double' if 'single' not in name else 'single'} blocks "
                                 f"but {have} {name}* output projections: the file is inconsistent.")
    mode = sd.get("controlnet_mode_embedder.weight") if hasattr(sd, "get") else None
    kwargs = {
        "patch_size": 1,
        "in_channels": int(in_ch),
        "num_layers": len(doubles),
        "num_single_layers": len(singles),
        "attention_head_dim": int(head_dim),
        "num_attention_heads": int(hidden // head_dim),
        "joint_attention_dim": int(_get(sd, "context_embedder.weight").shape[1]),
        "pooled_projection_dim": int(_get(sd, "time_text_embed.text_embedder.linear_1.weight").shape[1]),
        "guidance_embeds": "time_text_embed.guidance_embedder.linear_1.weight" in sd,
        "axes_dims_rope": list(rope_axes(int(head_dim))),
        "num_mode": None if mode is None else int(mode.shape[0]),
    }
    return {"kwargs": kwargs, "cond_channels": int(cond)}


def build_controlnet(cfg: dict):
    """``FluxControlNetModel`` for ``cfg``; call under ``torch.device("meta")`` to allocate nothing."""
    import torch
    from diffusers import FluxControlNetModel

    model = FluxControlNetModel(**cfg["kwargs"])
    if cfg["cond_channels"] != cfg["kwargs"]["in_channels"]:
        # alimama's control embedder also reads the mask: the only layer that differs from the diffusers class
        model.controlnet_x_embedder = torch.nn.Linear(cfg["cond_channels"], model.inner_dim)
    return model
