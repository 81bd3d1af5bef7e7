"""Reading the official FLUX 3 Image Klein files exactly: the transformer, the Qwen3-VL text encoder, the VAE.

Architectures come from tensor shapes (a ``config.json`` beside the weights only supplies what shapes cannot say:
rope theta and axes, norm epsilon, the text model's rope), so a tiny random checkpoint in an official layout loads
through exactly the code the real files do. Files are read with ``engine.loading.files`` (headers checked,
memory-mapped, shard sets and indexes) and modules assembled with ``engine.loading.load.assemble`` (built on the meta
device, every tensor matched one to one and shape-exact, then assigned).

Components and their layouts (``detect_flux3``):

- ``dit``: diffusers ``transformer/`` (``Flux3Transformer2DModel`` keys) or BFL's single file ``model.safetensors``
  (``emb_in.{image,image_cond}``, ``content_mode_blocks``, ``txt_mode_blocks``, ``single_blocks``,
  ``{early,single}_stream_modulations.*.lin``, ``final_layer.image``), converted by diffusers' own
  ``convert_flux3_transformer_checkpoint_to_diffusers`` (renames; the final adaLN's (shift, scale) halves swapped
  to diffusers' (scale, shift)). The step-distilled model (flow map) has ``ref_time_in`` (diffusers:
  ``target_timestep_embedder``) and so ``flow_map=True``; the base model has none.
- ``text_encoder``: Qwen3-VL-4B-Instruct (``model.language_model.*`` + ``model.visual.*``, tied: no ``lm_head``)
  onto transformers' ``Qwen3VLTextModel`` (the language model alone: prompt encoding reads no image, so the vision
  tower stays in the file, listed in ``flux_studio_unused``). FLUX 3 reads ``hidden_states[4, 8, ..., 32]``
  (0 = the embeddings), 8 x 2560 = 20480 wide; only the decoder layers up to 32 (+1, see
  ``engine.flux2.loading.trim_text_encoder``) of the 36 are kept. A config.json key ``flux_studio_text_layers``
  (written only by the random-weight demo, whose encoder is 10 layers deep) replaces that list.
- ``vae``: FLUX.2's 32-channel ``AutoencoderKLFlux2`` (diffusers ``vae/``), loaded by ``engine.flux2.loading``.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from ..flux2 import loading as flux2_loading
from ..flux2.loading import _count, _shape, _strip, trim_text_encoder
from ..loading.errors import ModelFileError, few
from ..loading.files import FileGroup, add_group, read_state_dict, resolve_group
from ..loading.load import assemble

BFL_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
TEXT_LAYERS = (4, 8, 12, 16, 20, 24, 28, 32)    # hidden_states indices FLUX 3 reads (0 = embeddings)
TEXT_PREFIX = "model.language_model."
ROLE_NAMES = {"dit": "the FLUX 3 transformer (transformer/ or BFL's model.safetensors)",
              "vae": "the FLUX.2 VAE (vae/diffusion_pytorch_model.safetensors), which FLUX 3 uses",
              "text_encoder": "the FLUX 3 text encoder (text_encoder/: Qwen3-VL-4B-Instruct)"}
# Qwen3-VL-4B-Instruct's text config (its config.json), for a folder without one: what the shapes cannot say.
QWEN3_VL_TEXT_DEFAULTS = {"rope_parameters": {"rope_type": "default", "rope_theta": 5000000,
                                              "mrope_section": [24, 20, 20], "mrope_interleaved": True},
                          "rms_norm_eps": 1e-6, "max_position_embeddings": 262144, "hidden_act": "silu",
                          "attention_bias": False}


# ---------------------------------------------------------------------------------------------------- detection

def detect_flux3(keys) -> tuple[str, str, str]:
    """(role, format, description) of a FLUX 3 component from its keys; ("unknown", ...) with a description that
    says what the file is instead (a FLUX.2 or FLUX.1 file, another text encoder) for anything else."""
    ks = set(keys)
    p = _strip(ks, BFL_PREFIXES)
    if p + "early_stream_modulations.image.lin.weight" in ks and p + "emb_in.image.weight" in ks:
        kind = "step-distilled, ref_time_in" if p + "ref_time_in.in_layer.weight" in ks else "base, no ref_time_in"
        return "dit", "bfl", f"a FLUX 3 transformer (BFL layout, {kind})"
    if {"x_embedders.image.weight", "early_stream_modulations.image.linear.weight", "context_embedder.weight"} <= ks:
        kind = "step-distilled" if "target_timestep_embedder.linear_1.weight" in ks else "base"
        return "dit", "diffusers", f"a FLUX 3 transformer (diffusers layout, {kind})"
    if {TEXT_PREFIX + "embed_tokens.weight", TEXT_PREFIX + "layers.0.self_attn.q_norm.weight"} <= ks:
        return "text_encoder", "qwen3_vl", "a Qwen3-VL model (transformers layout)"
    role, fmt, desc = flux2_loading.detect_flux2(ks)
    if role == "vae":
        return role, fmt, desc
    if role == "dit":
        return "unknown", "unknown", f"{desc}, not FLUX 3's (FLUX.2 files load with Flux2ImagePipeline)"
    if role == "text_encoder":
        return "unknown", "unknown", (f"{desc}, a FLUX.2 text encoder: FLUX 3 reads Qwen3-VL-4B-Instruct "
                                      f"(text_encoder/ of black-forest-labs/flux-3-image-klein)")
    return "unknown", "unknown", desc.replace("FLUX.2", "FLUX 3")


# ---------------------------------------------------------------------------------------------------- transformer

def infer_transformer_config(sd, config_json: dict | None = None) -> dict:
    """``Flux3Transformer2DModel(**cfg)`` kwargs from the shapes of a diffusers-layout state dict."""
    keys = list(sd)
    inner, in_channels = _shape(sd, "x_embedders.image.weight")
    first = "single_transformer_blocks.0" if any(k.startswith("single_transformer_blocks.") for k in keys) \
        else "txt_mode_blocks.0"
    head_dim = _shape(sd, first + ".attn.norm_q.weight")[0]
    if inner % head_dim:
        raise ModelFileError(f"width {inner} is not a whole number of {head_dim}-wide heads.")
    per_mode = {name: _count(keys, re.escape(name) + r"\.(\d+)\.")
                for name in ("mode_blocks.image", "mode_blocks.image_cond", "txt_mode_blocks")}
    if len(set(per_mode.values())) != 1:
        raise ModelFileError(f"the per-mode block stacks differ in depth ({per_mode}); FLUX 3 has as many image, "
                             f"reference and text blocks: the file is incomplete.")
    out_rows = _shape(sd, "proj_out.weight")[0]
    if out_rows != in_channels:
        raise ModelFileError(f"proj_out gives {out_rows} channels but the image tokens have {in_channels}.")
    mlp_hidden = _shape(sd, first + ".ff.linear_in.weight")[0] // 2
    cfg = {
        "in_channels": in_channels, "cond_in_channels": _shape(sd, "x_embedders.image_cond.weight")[1],
        "num_layers": per_mode["txt_mode_blocks"],
        "num_single_layers": _count(keys, r"single_transformer_blocks\.(\d+)\."),
        "attention_head_dim": head_dim, "num_attention_heads": inner // head_dim,
        "joint_attention_dim": _shape(sd, "context_embedder.weight")[1],
        "timestep_channels": _shape(sd, "timestep_embedder.linear_1.weight")[1],
        "mlp_ratio": mlp_hidden / inner, "axes_dims_rope": flux2_loading.rope_axes(head_dim), "rope_theta": 10000,
        "eps": 1e-6, "flow_map": "target_timestep_embedder.linear_1.weight" in sd,
    }
    for name in ("axes_dims_rope", "rope_theta", "eps"):     # not in the shapes: the folder's config.json says
        if config_json and name in config_json:
            value = config_json[name]
            cfg[name] = tuple(value) if isinstance(value, list) else value
    if sum(cfg["axes_dims_rope"]) != head_dim:
        raise ModelFileError(f"rotary axes {list(cfg['axes_dims_rope'])} do not add up to the {head_dim}-wide heads.")
    return cfg


def convert_bfl_transformer(sd) -> dict:
    """BFL FLUX 3 keys -> diffusers ``Flux3Transformer2DModel`` keys, by diffusers' own converter (views and a
    concatenation only; works on meta tensors). Keys the converter passes through unrenamed are left for
    ``assemble`` to report as having no place in the model."""
    from diffusers.loaders.single_file_utils import convert_flux3_transformer_checkpoint_to_diffusers
    p = _strip(sd, BFL_PREFIXES)
    return convert_flux3_transformer_checkpoint_to_diffusers({k[len(p):]: t for k, t in sd.items()})


def build_transformer(cfg: dict):
    from diffusers import Flux3Transformer2DModel
    return Flux3Transformer2DModel(**cfg)


def keep_in_fp32(model) -> None:
    """The modules diffusers keeps in float32 whatever the load dtype (``_keep_in_fp32_modules``: FLUX 3's QK norms,
    which run on float32 queries and keys), as its ``from_pretrained`` does."""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, module in model.named_modules():
        if keep & set(name.split(".")) and any(p.is_floating_point() and not p.is_meta for p in module.parameters()):
            module.to(torch.float32)


# ---------------------------------------------------------------------------------------------------- text encoder

def infer_text_config(sd, config_json: dict | None = None):
    """``Qwen3VLTextConfig`` of the language model of a Qwen3-VL file: widths, heads and depth from the shapes; rope,
    norm epsilon and the token ids from config.json's ``text_config`` (Qwen3-VL-4B-Instruct's values without one)."""
    from transformers import Qwen3VLConfig, Qwen3VLTextConfig
    cj = {k: v for k, v in (config_json or {}).items() if not k.startswith("flux_studio_")}
    if "text_config" in cj:
        base = Qwen3VLConfig(**cj).text_config.to_dict()
    elif cj.get("model_type") == "qwen3_vl_text":
        base = Qwen3VLTextConfig(**cj).to_dict()
    else:
        base = dict(QWEN3_VL_TEXT_DEFAULTS)
    keys = list(sd)
    vocab, hidden = _shape(sd, TEXT_PREFIX + "embed_tokens.weight")
    a = TEXT_PREFIX + "layers.0.self_attn."
    head_dim = _shape(sd, a + "q_norm.weight")[0]
    dims = dict(vocab_size=vocab, hidden_size=hidden, head_dim=head_dim,
                num_hidden_layers=_count(keys, re.escape(TEXT_PREFIX) + r"layers\.(\d+)\."),
                num_attention_heads=_shape(sd, a + "q_proj.weight")[0] // head_dim,
                num_key_value_heads=_shape(sd, a + "k_proj.weight")[0] // head_dim,
                intermediate_size=_shape(sd, TEXT_PREFIX + "layers.0.mlp.gate_proj.weight")[0])
    if not config_json and head_dim != 128:
        raise ModelFileError(f"a Qwen3-VL text model with {head_dim}-wide heads needs its config.json beside the "
                             f"weights (its rope sections); download the whole text_encoder/ folder.")
    allowed = set(Qwen3VLTextConfig.__dataclass_fields__) if hasattr(Qwen3VLTextConfig, "__dataclass_fields__") \
        else set(base)
    kwargs = {k: v for k, v in base.items() if k in allowed and k not in ("architectures", "transformers_version")}
    kwargs.update(dims)
    return Qwen3VLTextConfig(**kwargs)


def text_layers(config_json: dict | None) -> tuple:
    """The hidden states FLUX 3 reads: (4, 8, ..., 32), or the demo's list from its config.json."""
    layers = (config_json or {}).get("flux_studio_text_layers")
    return tuple(int(i) for i in layers) if layers else TEXT_LAYERS


def convert_text_encoder(sd) -> tuple[dict, list]:
    """Qwen3-VL file keys -> ``Qwen3VLTextModel`` keys; returns (tensors, unused keys): the vision tower
    (``model.visual.*``) and an ``lm_head`` (tied in Qwen3-VL-4B; absent from the file) are never read."""
    out, unused = {}, []
    for k, t in sd.items():
        if k.startswith(TEXT_PREFIX):
            out[k[len(TEXT_PREFIX):]] = t
        elif k.startswith("model.visual.") or k == "lm_head.weight":
            unused.append(k)
        else:
            raise ModelFileError(f"the Qwen3-VL file has a tensor no Qwen3-VL model has: {k}.")
    return out, unused


def build_text_encoder(conf, device=None):
    from transformers import Qwen3VLTextModel
    return flux2_loading._with_rotary(Qwen3VLTextModel(conf), device)


def _missing_layers(model_layers: int, layers) -> None:
    if max(layers) >= model_layers:
        raise ModelFileError(f"the text encoder has {model_layers} decoder layers but FLUX 3 reads hidden state "
                             f"{max(layers)}: the file is incomplete or another model's.")


# ---------------------------------------------------------------------------------------------------- load

def load_component(g: FileGroup, role: str, fmt: str, dtype, device, trim: bool = True) -> torch.nn.Module:
    device = torch.device(device)
    if role == "vae":
        return flux2_loading.load_component(g, role, fmt, dtype, device)
    sd = read_state_dict(g, device="meta" if device.type == "meta" else None)
    cj = g.config()
    if role == "dit":
        tensors = convert_bfl_transformer(sd) if fmt == "bfl" else dict(sd)
        cfg = infer_transformer_config(tensors, cj if fmt == "diffusers" else None)
        model = assemble(lambda: build_transformer(cfg), tensors, dtype, device)
        keep_in_fp32(model)
        return model
    if role == "text_encoder":
        conf = infer_text_config(sd, cj)
        layers = text_layers(cj)
        _missing_layers(conf.num_hidden_layers, layers)
        tensors, unused = convert_text_encoder(sd)
        model = assemble(lambda: build_text_encoder(conf, device), tensors, dtype, device)
        model.flux_studio_unused = unused
        if trim:
            trim_text_encoder(model, layers)
        else:
            model.flux_studio_layers = layers
        return model
    raise ModelFileError(f"{g.label}: no FLUX 3 loader for {role} ({fmt}).")


def _groups(files) -> list[FileGroup]:
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    groups: list[FileGroup] = []
    for item in files:
        name = Path(item).name
        if Path(item).is_file() and not name.endswith((".safetensors", ".safetensors.index.json")):
            continue                   # config.json, tokenizer files and the like, matched beside the weights
        add_group(groups, resolve_group(item))
    return groups


def load_flux3_models(files, torch_dtype=torch.bfloat16, device="cpu", trim: bool = True) -> dict:
    """FLUX 3 components from files, shard sets, index jsons or folders -> {role: module}; roles ``dit``
    (``Flux3Transformer2DModel``; ``flow_map`` True for the step-distilled model), ``vae`` (``AutoencoderKLFlux2``),
    ``text_encoder`` (``Qwen3VLTextModel``, trimmed to the layers read; ``flux_studio_layers`` says which). Which
    component a file is comes from its keys. Each module carries ``flux_studio_files``, ``flux_studio_format``,
    ``flux_studio_role`` and ``flux_studio_description``."""
    out = {}
    for g in _groups(files):
        role, fmt, desc = detect_flux3(read_state_dict(g, device="meta"))
        if role == "unknown":
            raise ModelFileError(f"{g.label} holds {desc}; expected {', '.join(ROLE_NAMES.values())}.", g.label)
        if role in out:
            raise ModelFileError(f"{out[role].flux_studio_files[0]} and {g.label} both hold {ROLE_NAMES[role]}: pass "
                                 f"only one.", g.label)
        try:
            model = load_component(g, role, fmt, torch_dtype, device, trim=trim)
        except ModelFileError as e:
            raise ModelFileError(f"{g.label}: {e}" if g.label not in str(e) else str(e), g.label) from e
        model.flux_studio_files = [str(p) for p in g.files]
        model.flux_studio_format = fmt
        model.flux_studio_role = role
        model.flux_studio_description = desc
        out[role] = model
    return out

