"""Where a loaded module's layers and blocks are: what fp8 storage casts and what streaming moves one at a time.

Each rule is keyed by role in one table (``FP8_CHUNKS``, ``STREAM_BLOCKS``, ``GROUP_TARGETS``) with a default for a
role it does not name, and mirrors the rule on file keys in ``sizes`` (``CASTABLE``, ``BLOCKS``), so a plan made from
a file's header and one made from the loaded module agree.

The transformer's layers kept in the compute dtype: everything outside the blocks (embedders, final norm and
projection: 0.5% of the weights, the most sensitive ones). Inside the blocks every Linear is fp8, including the
modulation (AdaLN) linears, as DiffSynth-Studio does: 27% of the weights, without which fp8 saves too little.
FLUX.2's transformer is the same (its blocks are the same two lists; its shared modulation linears lie outside
them and stay). FLUX.2's text encoder (Qwen3 / Mistral): the decoder layers' Linears (not the token embedding: cast
whole at every call, its bf16 copy would cost more than fp8 saves); it streams layer by layer. T5: the feed-forward
(wi_0, wi_1, wo) is cast as one unit, because transformers' T5 casts its hidden states to ``wo.weight.dtype`` before
calling ``wo`` (an fp8 ``wo`` would round the activations to fp8); the relative position bias stays. SigLIP (Redux):
the encoder layers, as on its file. CLIP / VAE / others: diffusers' default skip patterns (norms, in/out
projections).
"""
from __future__ import annotations

import re

import torch

CASTABLE_LAYERS = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.ConvTranspose1d,
                   torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d, torch.nn.Embedding)  # diffusers' supported
GENERIC_SKIP = ("pos_embed", "patch_embed", "norm", "^proj_in$", "^proj_out$", "embeddings", "conv_in", "conv_out",
                "lora_")


def leaf_layers(module: torch.nn.Module, prefix: str, skip) -> list:
    """[(name, layer)] of the castable layers under ``module`` whose names match none of ``skip``."""
    out = []
    for name, child in module.named_children():
        full = f"{prefix}.{name}" if prefix else name
        if any(re.search(p, full) for p in skip):
            continue
        if isinstance(child, CASTABLE_LAYERS):
            out.append((full, child))
        else:
            out.extend(leaf_layers(child, full, skip))
    return out


def block_lists(module: torch.nn.Module) -> list:
    """[(name, blocks)] of a FLUX transformer in the order they run: FLUX.1/2's double then single blocks; FLUX 3's
    per-mode blocks (text, image, references: ``txt_mode_blocks``, ``mode_blocks[mode]``) then its joint ones."""
    lists = [("txt_mode_blocks", getattr(module, "txt_mode_blocks", []))]
    lists += [(f"mode_blocks.{mode}", blocks) for mode, blocks in getattr(module, "mode_blocks", {}).items()]
    return lists + [(n, getattr(module, n, [])) for n in ("transformer_blocks", "single_transformer_blocks")]


def _flux_blocks(module: torch.nn.Module, prefix: str = "") -> list:
    chunks = []
    for list_name, blocks in block_lists(module):
        for i, block in enumerate(blocks):
            name = f"{prefix}{list_name}.{i}"
            chunks.append((name, block, [(f"{name}.{n}", m) for n, m in leaf_layers(block, "", ("lora_",))]))
    return chunks


def _generic_chunks(module: torch.nn.Module) -> list:
    return [("", module, leaf_layers(module, "", GENERIC_SKIP))]


def _dit_chunks(module: torch.nn.Module) -> list:
    flux = hasattr(module, "transformer_blocks") or hasattr(module, "mode_blocks")
    return _flux_blocks(module) if flux else _generic_chunks(module)


def _controlnet_chunks(module: torch.nn.Module) -> list:
    """As the transformer: the blocks' layers; embedders, mode embedder and the zero-initialised output projections
    (controlnet_blocks) stay in the compute dtype. A MultiControlNet holds several under nets.<i>."""
    if hasattr(module, "nets"):
        return [c for i, net in enumerate(module.nets) for c in _flux_blocks(net, f"nets.{i}.")]
    return _flux_blocks(module)


def _t5_chunks(module: torch.nn.Module) -> list:
    if not (hasattr(module, "encoder") and hasattr(module.encoder, "block")):
        return _generic_chunks(module)
    chunks = [("encoder.embed_tokens", module.encoder.embed_tokens,
               [("encoder.embed_tokens", module.encoder.embed_tokens)])]
    for i, block in enumerate(module.encoder.block):
        name = f"encoder.block.{i}"
        units = [(f"{name}.{n}", m) for n, m in leaf_layers(block, "", ("relative_attention_bias",
                                                                         "DenseReluDense", "lora_"))]
        units += [(f"{name}.{n}", m) for n, m in block.named_modules() if n.endswith("DenseReluDense")]
        chunks.append((name, block, units))
    return chunks


def _siglip_layers(module: torch.nn.Module) -> tuple:
    """(prefix, encoder layers) of a transformers SigLIP vision model (``SiglipVisionModel`` or its body)."""
    body = getattr(module, "vision_model", module)
    prefix = "vision_model.encoder.layers" if body is not module else "encoder.layers"
    return prefix, list(getattr(getattr(body, "encoder", None), "layers", []))


def _siglip_chunks(module: torch.nn.Module) -> list:
    prefix, layers = _siglip_layers(module)
    if not layers:
        return _generic_chunks(module)
    return [(f"{prefix}.{i}", layer, [(f"{prefix}.{i}.{n}", m) for n, m in leaf_layers(layer, "", ("lora_",))])
            for i, layer in enumerate(layers)]


def _decoder_chunks(module: torch.nn.Module) -> list:
    """FLUX.2's text encoder (transformers' ``Qwen3Model`` / ``MistralModel``): each decoder layer's Linears
    (attention and MLP); the token embedding and the RMS norms (q/k norms included) stay in the compute dtype."""
    layers = list(getattr(module, "layers", []))
    if not layers:
        return _generic_chunks(module)
    return [(f"layers.{i}", layer, [(f"layers.{i}.{n}", m) for n, m in leaf_layers(layer, "", ("lora_",))])
            for i, layer in enumerate(layers)]


# role -> [(chunk name, chunk, [(layer name, layer)])]: the units cast to fp8, grouped by block (cast, then moved)
FP8_CHUNKS = {
    "dit": _dit_chunks, "controlnet": _controlnet_chunks, "text_encoder_2": _t5_chunks,
    "infinityou_infusenet": _controlnet_chunks,
    "flux_redux_image_encoder": _siglip_chunks, "text_encoder": _decoder_chunks,
}


def fp8_chunks(role: str, module: torch.nn.Module) -> list:
    """[(chunk name, chunk, [(layer name, layer)])]: the units cast to fp8, grouped by block (cast, then moved)."""
    return FP8_CHUNKS.get(role, _generic_chunks)(module)


def fp8_layers(role: str, module: torch.nn.Module) -> list:
    """Every (name, module) that gets a layer-wise casting hook under fp8 storage."""
    return [u for _n, _c, units in fp8_chunks(role, module) for u in units]


def _encoder_list(attr: str):
    """The blocks of ``module.encoder.<attr>`` (T5's ``block``, CLIP's ``layers``)."""
    return lambda module: list(getattr(getattr(module, "encoder", None), attr, []))


# role -> the blocks group offloading streams one at a time (the rest moves in with the first call); none for a role
# not named
STREAM_BLOCKS = {
    "dit": lambda m: [b for _name, blocks in block_lists(m) for b in blocks],
    "text_encoder_2": _encoder_list("block"),
    "text_encoder_1": _encoder_list("layers"),
    "flux_redux_image_encoder": lambda m: _siglip_layers(m)[1],
    "text_encoder": lambda m: list(getattr(m, "layers", [])),      # FLUX.2's decoder layers; the rest moves in once
}


def stream_blocks(role: str, module: torch.nn.Module) -> list:
    """The blocks group offloading streams one at a time (the rest moves in with the first call)."""
    find = STREAM_BLOCKS.get(role)
    return find(module) if find else []


def _t5_target(module):
    if hasattr(module, "encoder") and hasattr(module.encoder, "block"):
        return module.encoder, None          # T5EncoderModel.forward only calls encoder (embed_tokens is shared)
    return module, None


def _encoder_target(module):
    """CLIP's and SigLIP's transformers: the embeddings and the rest move in with the first call, the encoder's
    layers one at a time."""
    body = getattr(module, "vision_model", module)     # transformers 4's SigLIP wraps its body
    if hasattr(body, "encoder") and hasattr(body, "embeddings"):
        return body, ["encoder"]
    return module, None


# role -> (target module, block_modules) for diffusers' block-level group offloading; by default the module itself
# (the FLUX transformer's ModuleLists; the VAE names its own)
GROUP_TARGETS = {"text_encoder_2": _t5_target, "text_encoder_1": _encoder_target,
                 "flux_redux_image_encoder": _encoder_target,
                 # FLUX 3's per-mode image blocks sit in a ModuleDict, which block-level offloading only enters
                 # when named
                 "dit": lambda m: (m, ["mode_blocks"]) if hasattr(m, "mode_blocks") else (m, None)}


def group_target(role: str, module: torch.nn.Module) -> tuple:
    return GROUP_TARGETS.get(role, lambda m: (m, None))(module)
