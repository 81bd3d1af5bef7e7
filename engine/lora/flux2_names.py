"""FLUX.2 LoRA key formats, mapped onto diffusers' ``Flux2Transformer2DModel`` module names (no torch).

FLUX.2 ([klein] 4B / 9B, their base models, [dev]) has no per-block modulation (three shared ones instead), a
SwiGLU MLP (``ff.linear_in`` maps h -> 2 x 3h, ``ff.linear_out`` 3h -> h) and single blocks with one fused input
projection (``attn.to_qkv_mlp_proj``: q | k | v | mlp-in) and one output (``attn.to_out``). The formats, and the
layer a pair lands on (``engine.lora.flux2_formats`` reads them; ``formats.parse_lora`` does the work):

=================  ==============================================================================  ====================
format             a key                                                                           matrices / alpha
=================  ==============================================================================  ====================
diffusers/PEFT     ``transformer.transformer_blocks.0.attn.to_q.lora_A.weight``                    lora_A/lora_B; alpha
                   (diffusers' ``save_lora_weights``; also ``base_model.model.`` or no prefix)     from the
                                                                                                   ``lora_adapter_
                                                                                                   metadata`` JSON,
                                                                                                   adapter_config.json
                                                                                                   or ``.alpha`` keys
DiffSynth          ``transformer_blocks.0.attn.to_q.lora_A.default.weight``                        lora_A/lora_B, no
                   ``single_transformer_blocks.0.attn.to_qkv_mlp_proj.lora_B.default.weight``      alpha (= rank:
                   (DiffSynth-Studio's FLUX.2 trainer: PEFT on its Flux2DiT, which has diffusers'   scale 1)
                   module names, saved with ``pipe.dit.`` removed; ``.default`` kept)
kohya / ComfyUI    ``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`` + ``.alpha``        lora_down/lora_up,
                   (sd-scripts: ``lora_unet_`` + BFL module path with '.' -> '_')                  ``.alpha``
ai-toolkit         ``diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight``                  lora_A/lora_B (no
                   (BFL module names, PEFT matrices; ComfyUI's own saves use                       alpha); lora_down/up
                   ``diffusion_model.`` + lora_down/lora_up + ``.alpha``: "ComfyUI")               + ``.alpha``
=================  ==============================================================================  ====================

BFL module -> diffusers module (``double_blocks.N.`` -> ``transformer_blocks.N.``, ``single_blocks.N.`` ->
``single_transformer_blocks.N.``):

- ``img_attn.qkv`` / ``txt_attn.qkv`` -> ``attn.to_q|to_k|to_v`` / ``attn.add_q_proj|add_k_proj|add_v_proj``: the
  down matrix shared, the up matrix split row-wise in three (or, when it is block-diagonal -- a LoRA made by
  concatenating three -- both split, each part keeping its rank). diffusers' fused ``attn.to_qkv`` /
  ``attn.to_added_qkv`` names are split the same way.
- ``img_attn.proj`` -> ``attn.to_out.0``, ``txt_attn.proj`` -> ``attn.to_add_out``, ``img_mlp.0|2`` ->
  ``ff.linear_in|linear_out``, ``txt_mlp.0|2`` -> ``ff_context.linear_in|linear_out``.
- single ``linear1`` -> ``attn.to_qkv_mlp_proj`` (fused in diffusers too: as is), ``linear2`` -> ``attn.to_out``.
- ``img_in`` -> ``x_embedder``, ``txt_in`` -> ``context_embedder``, ``time_in`` / ``guidance_in``
  ``.in_layer|out_layer`` -> ``time_guidance_embed.timestep_embedder|guidance_embedder.linear_1|linear_2``,
  ``double_stream_modulation_img|txt.lin`` / ``single_stream_modulation.lin`` -> ``.linear``, ``final_layer.linear``
  -> ``proj_out``, ``final_layer.adaLN_modulation.1`` -> ``norm_out.linear`` with the two halves of the up matrix
  swapped: BFL orders the final modulation (shift, scale), diffusers (scale, shift) -- as loading BFL's own
  transformer file does (``engine.flux2.loading.convert_bfl_transformer``). diffusers' FLUX.2 LoRA converter maps
  that layer without the swap; on it we follow the weights' conversion, not the converter.
"""
from __future__ import annotations

# (kind, diffusers targets): kind "plain", "qkv" (3-way split of a fused projection), "swap" (halves swapped)
_QKV_IMG = ("qkv", ("attn.to_q", "attn.to_k", "attn.to_v"))
_QKV_TXT = ("qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"))


def _p(*targets):
    return ("plain", targets)


BFL_DOUBLE = {
    "img_attn.qkv": _QKV_IMG, "txt_attn.qkv": _QKV_TXT,
    "img_attn.proj": _p("attn.to_out.0"), "txt_attn.proj": _p("attn.to_add_out"),
    "img_mlp.0": _p("ff.linear_in"), "img_mlp.2": _p("ff.linear_out"),
    "txt_mlp.0": _p("ff_context.linear_in"), "txt_mlp.2": _p("ff_context.linear_out"),
}
BFL_SINGLE = {"linear1": _p("attn.to_qkv_mlp_proj"), "linear2": _p("attn.to_out")}
BFL_TOP = {
    "img_in": _p("x_embedder"), "txt_in": _p("context_embedder"),
    "time_in.in_layer": _p("time_guidance_embed.timestep_embedder.linear_1"),
    "time_in.out_layer": _p("time_guidance_embed.timestep_embedder.linear_2"),
    "guidance_in.in_layer": _p("time_guidance_embed.guidance_embedder.linear_1"),
    "guidance_in.out_layer": _p("time_guidance_embed.guidance_embedder.linear_2"),
    "double_stream_modulation_img.lin": _p("double_stream_modulation_img.linear"),
    "double_stream_modulation_txt.lin": _p("double_stream_modulation_txt.linear"),
    "single_stream_modulation.lin": _p("single_stream_modulation.linear"),
    "final_layer.linear": _p("proj_out"),
    "final_layer.adaLN_modulation.1": ("swap", ("norm_out.linear",)),
}

DIFFUSERS_DOUBLE_LINEARS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj",
                            "attn.add_v_proj", "attn.to_out.0", "attn.to_add_out", "ff.linear_in", "ff.linear_out",
                            "ff_context.linear_in", "ff_context.linear_out")
DIFFUSERS_SINGLE_LINEARS = ("attn.to_qkv_mlp_proj", "attn.to_out")
DIFFUSERS_TOP_LINEARS = ("x_embedder", "context_embedder", "time_guidance_embed.timestep_embedder.linear_1",
                         "time_guidance_embed.timestep_embedder.linear_2",
                         "time_guidance_embed.guidance_embedder.linear_1",
                         "time_guidance_embed.guidance_embedder.linear_2", "double_stream_modulation_img.linear",
                         "double_stream_modulation_txt.linear", "single_stream_modulation.linear", "norm_out.linear",
                         "proj_out")
DIFFUSERS_DOUBLE = {**{n: _p(n) for n in DIFFUSERS_DOUBLE_LINEARS},
                    "attn.to_qkv": _QKV_IMG, "attn.to_added_qkv": _QKV_TXT}   # diffusers' fused projections
DIFFUSERS_SINGLE = {n: _p(n) for n in DIFFUSERS_SINGLE_LINEARS}
DIFFUSERS_TOP = {n: _p(n) for n in DIFFUSERS_TOP_LINEARS}

# naming -> (double block prefix, single block prefix, double table, single table, top table), as formats.NAMINGS
NAMINGS = {
    "diffusers": ("transformer_blocks", "single_transformer_blocks", DIFFUSERS_DOUBLE, DIFFUSERS_SINGLE,
                  DIFFUSERS_TOP),
    "BFL": ("double_blocks", "single_blocks", BFL_DOUBLE, BFL_SINGLE, BFL_TOP),
}


def _underscored(table):
    return {k.replace(".", "_"): v for k, v in table.items()}


# kohya-style names ('.' -> '_'): lora_unet_ + BFL names (sd-scripts, ComfyUI), lora_transformer_ + diffusers names
UNDERSCORED = {n: (NAMINGS[n][0], NAMINGS[n][1], _underscored(NAMINGS[n][2]), _underscored(NAMINGS[n][3]),
                   _underscored(NAMINGS[n][4])) for n in NAMINGS}
