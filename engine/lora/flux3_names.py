"""FLUX 3 LoRA key formats, mapped onto diffusers' ``Flux3Transformer2DModel`` module names (no torch).

FLUX 3 Image Klein has three per-mode streams of blocks before its joint single blocks -- the image
(``mode_blocks.image``), the references (``mode_blocks.image_cond``) and the text (``txt_mode_blocks``) -- and every
block, per-mode or joint, is the same parallel attention + SwiGLU MLP with separate q, k, v projections
(``attn.to_q|to_k|to_v``, ``attn.to_out.0``, ``ff.linear_in`` h -> 6h, ``ff.linear_out`` 3h -> h). Modulation is per
mode (``early_stream_modulations.<mode>`` for the per-mode blocks, ``single_stream_modulations.<mode>`` for the joint
ones); there is no per-block modulation and no guidance embedder. The formats (``engine.lora.flux3_formats`` reads
them; ``formats.parse_lora`` does the work):

==============  ===============================================================================  ====================
format          a key                                                                            matrices / alpha
==============  ===============================================================================  ====================
diffusers/PEFT  ``transformer.mode_blocks.image.0.attn.to_q.lora_A.weight``                       lora_A/lora_B; alpha
                ``transformer.single_transformer_blocks.0.ff.linear_in.lora_B.weight``            from the ``lora_
                (diffusers' ``save_lora_weights``; also ``base_model.model.`` or no prefix)       adapter_metadata``
                                                                                                 JSON, adapter_
                                                                                                 config.json or
                                                                                                 ``.alpha`` keys
BFL             ``diffusion_model.content_mode_blocks.image.0.q_proj.lora_A.weight``              lora_A/lora_B, no
                ``diffusion_model.single_blocks.0.mlp_in.lora_B.weight``                          alpha
                (BFL's module names: what diffusers' ``Flux3LoraLoaderMixin`` converts)
ComfyUI         the BFL names under ``diffusion_model.`` with lora_down/lora_up + ``.alpha``      lora_down/lora_up,
                                                                                                 ``.alpha``
kohya           ``lora_unet_content_mode_blocks_image_0_q_proj.lora_down.weight`` + ``.alpha``    lora_down/lora_up,
                (sd-scripts: ``lora_unet_`` + BFL module path with '.' -> '_')                    ``.alpha``
OneTrainer      ``lora_transformer_mode_blocks_image_0_attn_to_q.lora_down.weight``               as kohya
                (kohya-style over the diffusers module path)
DiffSynth       ``content_mode_blocks.image.0.q_proj.lora_A.default.weight``                      lora_A/lora_B, no
                (PEFT inside DiffSynth-Studio's trainer on its Flux3DiT, whose parameter names    alpha (= rank:
                are the BFL file's; saved without a prefix, ``.default`` kept)                    scale 1)
==============  ===============================================================================  ====================

BFL module -> diffusers module (the weights' own conversion, diffusers'
``convert_flux3_transformer_checkpoint_to_diffusers``; its LoRA converter ``_convert_non_diffusers_flux3_lora_to_
diffusers`` maps the block layers the same way):

- blocks: ``content_mode_blocks.<image|image_cond>.N.`` -> ``mode_blocks.<image|image_cond>.N.``,
  ``txt_mode_blocks.N.`` -> ``txt_mode_blocks.N.``, ``single_blocks.N.`` -> ``single_transformer_blocks.N.``; inside
  each: ``q_proj|k_proj|v_proj`` -> ``attn.to_q|to_k|to_v``, ``attn_out`` -> ``attn.to_out.0``, ``mlp_in|mlp_out``
  -> ``ff.linear_in|linear_out``.
- ``emb_in.<image|image_cond>`` -> ``x_embedders.<image|image_cond>``, ``txt_in`` -> ``context_embedder``,
  ``time_in`` / ``ref_time_in`` ``.in_layer|out_layer`` -> ``timestep_embedder`` / ``target_timestep_embedder``
  ``.linear_1|linear_2``, ``<early|single>_stream_modulations.<mode>.lin`` -> ``.linear``,
  ``final_layer.image.linear`` -> ``proj_out``, ``final_layer.image.adaLN_modulation.1`` -> ``norm_out.linear`` with
  the two halves of the up matrix swapped (BFL's (shift, scale) -> diffusers' (scale, shift), as the weights are).
  diffusers' LoRA converter leaves these top-level names unconverted (PEFT then finds no such layer and drops them);
  we follow the weights' conversion.
- diffusers' fused ``attn.to_qkv`` (``fuse_qkv_projections``) is split onto ``to_q|to_k|to_v``: the down matrix
  shared, the up matrix split row-wise in three (both split when it is block-diagonal), as for FLUX.1 and FLUX.2.
"""
from __future__ import annotations

from collections.abc import Mapping

# (kind, diffusers targets): kind "plain", "qkv" (3-way split of a fused projection), "swap" (halves swapped)
_QKV = ("qkv", ("attn.to_q", "attn.to_k", "attn.to_v"))
MODES = ("image", "image_cond")
STREAM_MODES = (*MODES, "txt")


def _p(*targets):
    return ("plain", targets)


# One block's linears, per-mode or joint (the same layers in both)
DIFFUSERS_BLOCK_LINEARS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "ff.linear_in", "ff.linear_out")
DIFFUSERS_BLOCK = {**{n: _p(n) for n in DIFFUSERS_BLOCK_LINEARS}, "attn.to_qkv": _QKV}
BFL_BLOCK = {"q_proj": _p("attn.to_q"), "k_proj": _p("attn.to_k"), "v_proj": _p("attn.to_v"),
             "attn_out": _p("attn.to_out.0"), "mlp_in": _p("ff.linear_in"), "mlp_out": _p("ff.linear_out")}

# The per-mode streams: {the file's stream prefix: diffusers' stream prefix}
DIFFUSERS_STREAMS = {"mode_blocks.image": "mode_blocks.image", "mode_blocks.image_cond": "mode_blocks.image_cond",
                     "txt_mode_blocks": "txt_mode_blocks"}
BFL_STREAMS = {"content_mode_blocks.image": "mode_blocks.image",
               "content_mode_blocks.image_cond": "mode_blocks.image_cond", "txt_mode_blocks": "txt_mode_blocks"}

DIFFUSERS_TOP_LINEARS = ("x_embedders.image", "x_embedders.image_cond", "context_embedder",
                         "timestep_embedder.linear_1", "timestep_embedder.linear_2",
                         "target_timestep_embedder.linear_1", "target_timestep_embedder.linear_2",
                         *(f"{kind}_stream_modulations.{m}.linear" for kind in ("early", "single")
                           for m in STREAM_MODES),
                         "norm_out.linear", "proj_out")
DIFFUSERS_TOP = {n: _p(n) for n in DIFFUSERS_TOP_LINEARS}
BFL_TOP = {
    "emb_in.image": _p("x_embedders.image"), "emb_in.image_cond": _p("x_embedders.image_cond"),
    "txt_in": _p("context_embedder"),
    "time_in.in_layer": _p("timestep_embedder.linear_1"), "time_in.out_layer": _p("timestep_embedder.linear_2"),
    "ref_time_in.in_layer": _p("target_timestep_embedder.linear_1"),
    "ref_time_in.out_layer": _p("target_timestep_embedder.linear_2"),
    **{f"{kind}_stream_modulations.{m}.lin": _p(f"{kind}_stream_modulations.{m}.linear")
       for kind in ("early", "single") for m in STREAM_MODES},
    "final_layer.image.linear": _p("proj_out"),
    "final_layer.image.adaLN_modulation.1": ("swap", ("norm_out.linear",)),
}


class StreamTable(Mapping):
    """The names outside the joint single blocks: the top-level layers (a fixed table) and the per-mode stream
    blocks (``<stream>.<N>.<layer>``, any N), as one lookup table for ``formats.parse_lora`` (which matches only
    the double/single block prefixes of FLUX.1 and FLUX.2 by pattern, everything else by table)."""

    def __init__(self, streams: dict, block: dict, top: dict, sep: str = "."):
        self.streams, self.block, self.top, self.sep = streams, block, top, sep

    def __getitem__(self, path: str):
        if path in self.top:
            return self.top[path]
        for prefix, target in self.streams.items():      # "mode_blocks_image_cond_0" also starts "mode_blocks_image_"
            if not path.startswith(prefix + self.sep):
                continue
            index, _, rest = path[len(prefix) + 1:].partition(self.sep)
            if index.isdigit() and rest in self.block:
                kind, targets = self.block[rest]
                return kind, tuple(f"{target}.{index}.{t}" for t in targets)
        raise KeyError(path)

    def __iter__(self):
        return iter(self.top)

    def __len__(self):
        return len(self.top)

    def underscored(self) -> "StreamTable":
        """The same table over kohya-style names ('.' -> '_')."""
        return StreamTable({k.replace(".", "_"): v for k, v in self.streams.items()}, _underscored(self.block),
                           _underscored(self.top), sep="_")


def _underscored(table):
    return {k.replace(".", "_"): v for k, v in table.items()}


# naming -> (double block prefix, single block prefix, double table, single table, top table), as formats.NAMINGS.
# FLUX 3 has no double blocks: FLUX.1/FLUX.2 names there map to nothing (and such a file is refused by its family).
NAMINGS = {
    "diffusers": ("transformer_blocks", "single_transformer_blocks", {}, DIFFUSERS_BLOCK,
                  StreamTable(DIFFUSERS_STREAMS, DIFFUSERS_BLOCK, DIFFUSERS_TOP)),
    "BFL": ("double_blocks", "single_blocks", {}, BFL_BLOCK, StreamTable(BFL_STREAMS, BFL_BLOCK, BFL_TOP)),
}
# kohya-style names: lora_unet_ + BFL names (sd-scripts, ComfyUI), lora_transformer_ + diffusers names (OneTrainer)
UNDERSCORED = {n: (dbl, sgl, {}, _underscored(stab), top.underscored())
               for n, (dbl, sgl, _d, stab, top) in NAMINGS.items()}


def bfl_module(path: str) -> str:
    """The BFL module path (DiffSynth-Studio's Flux3DiT names) of a diffusers ``Flux3Transformer2DModel`` linear
    layer: the inverse of the plain entries above, for writing LoRAs in DiffSynth's keys. KeyError for
    ``norm_out.linear`` (BFL's halves are swapped: not a renaming) and any other path."""
    for bfl, (kind, targets) in BFL_TOP.items():
        if kind == "plain" and targets == (path,):
            return bfl
    streams = {**{v: k for k, v in BFL_STREAMS.items()}, "single_transformer_blocks": "single_blocks"}
    block = {targets[0]: name for name, (_kind, targets) in BFL_BLOCK.items()}
    for theirs, ours in streams.items():
        if path.startswith(theirs + "."):
            index, _, rest = path[len(theirs) + 1:].partition(".")
            if index.isdigit() and rest in block:
                return f"{ours}.{index}.{block[rest]}"
    raise KeyError(path)
