"""Component sizes for the planner, from a checkpoint manifest, a safetensors header or a loaded module.

Parameter counts (dtype-free), of which how many are stored in fp8 under fp8 storage, per streamable block, the
largest fp8 layer (cast back to the compute dtype one at a time) and the widths the activation estimates need.
Pure: no torch at import (``sizes_from_module`` imports it when called).

What is role-specific is keyed by role in one table per concern, each with a default for roles it does not name:
``BLOCKS`` (which keys form a streamable block), ``CASTABLE`` (which keys are stored in fp8), ``KEEP`` (which keys
belong to the component when one file holds two) and ``DIMS`` (widths read from the shapes).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

GiB = 1024 ** 3
FP8 = "float8_e4m3fn"
FP8_NAMES = ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
ITEMSIZE = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1,
            "float8_e4m3fnuz": 1, "float8_e5m2fnuz": 1, "int64": 8, "int32": 4, "int16": 2, "int8": 1,
            "uint8": 1, "bool": 1}
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                      "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
                      "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def gb(nbytes) -> float:
    return float(nbytes) / GiB


def dtype_name(dtype) -> Optional[str]:
    """torch.bfloat16 / "torch.bfloat16" / "bfloat16" / "BF16" -> "bfloat16"; "disk" stays; None stays."""
    if dtype is None:
        return None
    text = str(dtype).replace("torch.", "")
    return SAFETENSORS_DTYPES.get(text, text)


def device_name(device) -> Optional[str]:
    """"cuda" -> "cuda:0" (so that "cuda" and "cuda:0" compare equal), "cpu" -> "cpu"; None stays."""
    if device is None:
        return None
    text = str(device)
    if text == "cuda":
        return "cuda:0"
    return text


def is_fp8(dtype) -> bool:
    return dtype_name(dtype) in FP8_NAMES


@dataclass(frozen=True)
class ComponentSize:
    """What the planner needs to know about one component, in parameter counts (dtype-free)."""

    role: str
    params: int                          # all parameters (tied ones once)
    fp8_params: int = 0                  # of these, the ones stored in fp8 when the component is stored in fp8
    blocks: tuple = ()                   # parameters of each streamable block, in order
    block_fp8: tuple = ()                # fp8-castable parameters of each block
    largest_layer: int = 0               # parameters of the largest fp8-castable layer (cast to bf16 one at a time)
    file_dtype: Optional[str] = None     # the dtype most of the file is stored in
    dims: Mapping = field(default_factory=dict)  # widths for activation estimates (hidden, channels, d_model, d_ff)
    # Weights a GGUF / 4-bit / fp8 file keeps quantized (engine.loading.quantized): counted in ``params`` (compute
    # is per parameter) but stored at their real bytes and never cast: how many parameters, their bytes, per block.
    packed_params: int = 0
    packed_bytes: int = 0
    block_packed_params: tuple = ()
    block_packed: tuple = ()

    @staticmethod
    def _bytes(n, f, pn, pb, storage: str, compute: str) -> int:
        """Bytes of ``n`` parameters: ``f`` fp8-castable, ``pn`` packed in ``pb`` bytes, the rest in the dtype."""
        if is_fp8(storage):
            return f * ITEMSIZE[storage] + (n - f - pn) * ITEMSIZE[compute] + pb
        return (n - pn) * ITEMSIZE[storage] + pb

    def nbytes(self, storage: str, compute: str) -> int:
        return self._bytes(self.params, self.fp8_params, self.packed_params, self.packed_bytes, storage, compute)

    def nonblock_bytes(self, storage: str, compute: str) -> int:
        return self._bytes(self.params - sum(self.blocks), self.fp8_params - sum(self.block_fp8),
                           self.packed_params - sum(self.block_packed_params),
                           self.packed_bytes - sum(self.block_packed), storage, compute)

    def block_bytes(self, storage: str, compute: str) -> tuple:
        """Bytes of each streamable block, in order."""
        zeros = (0,) * len(self.blocks)
        return tuple(self._bytes(n, f, pn, pb, storage, compute) for n, f, pn, pb in
                     zip(self.blocks, self.block_fp8, self.block_packed_params or zeros, self.block_packed or zeros))

    def max_block_bytes(self, storage: str, compute: str) -> int:
        return max(self.block_bytes(storage, compute), default=0)


# --------------------------------------------------------------------------------- per-role rules on file keys
# FLUX 3's per-mode blocks too: txt_mode_blocks, and the image / reference ones (BFL content_mode_blocks.<mode>,
# diffusers mode_blocks.<mode>), which run before the joint single blocks
DIT_BLOCKS = re.compile(r"(?:^|\.)(double_blocks|single_blocks|transformer_blocks|single_transformer_blocks|"
                        r"txt_mode_blocks|(?:content_)?mode_blocks\.image(?:_cond)?)\.(\d+)\.")
LAYERS = re.compile(r"(?:^|\.)(layers)\.(\d+)\.")        # CLIP's and SigLIP's encoder layers
# The streamable blocks (matching ``layers.stream_blocks`` on the loaded module); a role not named has none.
BLOCKS = {
    "dit": DIT_BLOCKS,
    "text_encoder_2": re.compile(r"(?:^|\.)(block)\.(\d+)\."),
    "text_encoder_1": LAYERS,
    "flux_redux_image_encoder": LAYERS,
    "text_encoder": LAYERS,                               # FLUX.2's Qwen3 / Mistral decoder layers
}
# The lists that run before the single blocks, in their order (FLUX 3: text, image, reference blocks)
FIRST_BLOCK_LISTS = ("txt_mode_blocks", "mode_blocks.image", "content_mode_blocks.image", "mode_blocks.image_cond",
                     "content_mode_blocks.image_cond", "double_blocks", "transformer_blocks", "block", "layers")


def _weight_like(key: str, shape, shapes: Mapping) -> bool:
    """A Linear/Conv/Embedding weight, or the bias that goes with one."""
    if len(shape) >= 2:
        return True
    if key.endswith(".bias"):
        w = shapes.get(key[:-5] + ".weight")
        return w is not None and len(w) >= 2
    return False


def _in_blocks(pattern) -> Callable:
    return lambda key, shape, shapes: bool(pattern.search(key)) and _weight_like(key, shape, shapes)


def _t5_castable(key, shape, shapes) -> bool:
    return len(shape) >= 2 and "relative_attention_bias" not in key


def _generic_castable(key, shape, shapes) -> bool:
    """Every Linear/Conv/Embedding weight but norms, embeddings and the in/out convolutions (diffusers' defaults).
    Only ``.weight`` tensors: a bare parameter (a pooling probe, a fused in-projection) is not a castable layer."""
    if not (key.endswith(".weight") or key.endswith(".bias")) or not _weight_like(key, shape, shapes):
        return False
    return not any(w in key for w in ("norm", "conv_in", "conv_out", "embeddings", "pos_embed", "patch_embed"))


def _decoder_castable(key, shape, shapes) -> bool:
    """FLUX.2's text encoder (a Qwen3 / Mistral decoder): the decoder layers' Linears. The token embedding stays in
    the compute dtype (a lookup of 512 rows; cast whole at every call it would cost a transient bf16 copy of up to
    1.3 GB), and so do the RMS norms."""
    return len(shape) >= 2 and bool(LAYERS.search(key))


# Which tensors are stored in fp8 under fp8 storage; mirrors ``layers.fp8_chunks`` on the loaded module. The
# transformer and ControlNets: only the blocks (norms and embedders stay in the compute dtype); T5: every matrix but
# the position bias; CLIP and SigLIP: the encoder layers.
CASTABLE = {
    "dit": _in_blocks(DIT_BLOCKS),
    "controlnet": _in_blocks(DIT_BLOCKS),
    "infinityou_infusenet": _in_blocks(DIT_BLOCKS),
    "text_encoder_2": _t5_castable,
    "text_encoder_1": _in_blocks(LAYERS),
    "flux_redux_image_encoder": _in_blocks(LAYERS),
    "text_encoder": _decoder_castable,
}

# Which tensors of a file belong to the component, where one file holds two (Step1X-Edit's transformer file has the
# connector under ``connector.``) or a tensor is tied (T5's ``embed_tokens`` is ``shared``): {key: shape} -> same.
def _without_tied_embedding(shapes: Mapping) -> dict:
    if not any(k.endswith("shared.weight") for k in shapes):
        return dict(shapes)
    return {k: s for k, s in shapes.items() if not k.endswith("embed_tokens.weight")}


def _flux2_text_encoder_kept(shapes: Mapping) -> dict:
    """FLUX.2's text encoder as ``engine.flux2.loading`` builds it: what the model reads (Mistral's vision tower,
    projector and both families' ``lm_head`` ship in the files unused) and the decoder layers up to the deepest hidden
    state the transformer reads (klein 27 of 36, [dev] 30 of 40). File keys are kept (their dtypes are looked up by
    them). Imports the loader (torch) when called."""
    from ..flux2.loading import TEXT_ENCODERS, detect_flux2
    from ..flux3 import loading as flux3
    if flux3.detect_flux3(shapes)[:2] == ("text_encoder", "qwen3_vl"):      # FLUX 3's Qwen3-VL: its text model
        convert, read = flux3.convert_text_encoder, flux3.TEXT_LAYERS
    else:
        role, fmt, _desc = detect_flux2(shapes)
        if role != "text_encoder" or fmt not in TEXT_ENCODERS:
            return dict(shapes)
        _infer, convert, _build, read = TEXT_ENCODERS[fmt]
    _tensors, unused = convert(shapes)
    unused = set(unused)

    def kept(key):
        m = LAYERS.search(key)
        return key not in unused and (m is None or int(m.group(2)) <= max(read))
    return {k: s for k, s in shapes.items() if kept(k)}


KEEP = {
    "dit": lambda shapes: {k: s for k, s in shapes.items() if not k.startswith("connector.")},
    "step1x_connector": lambda shapes: {k: s for k, s in shapes.items() if k.startswith("connector.")},
    "text_encoder_2": _without_tied_embedding,
    "text_encoder": _flux2_text_encoder_kept,
}


def castable_key(role: str, key: str, shape, shapes: Mapping) -> bool:
    """Whether a tensor (by file key) is stored in fp8 under fp8 storage."""
    if "lora_" in key:
        return False
    return CASTABLE.get(role, _generic_castable)(key, shape, shapes)


# ------------------------------------------------------------------------------- per-role widths from shapes
def _find(shapes: Mapping, *suffixes):
    for k, s in shapes.items():
        if any(k.endswith(x) for x in suffixes):
            return s
    return None


def _present(**dims) -> dict:
    return {k: int(v) for k, v in dims.items() if v}


def _dit_dims(shapes):
    s = _find(shapes, "img_in.weight", "x_embedder.weight")
    return _present(hidden=s[0] if s else None)


def _t5_dims(shapes):
    s, f = _find(shapes, "shared.weight"), _find(shapes, "DenseReluDense.wi_0.weight", "DenseReluDense.wi.weight")
    return _present(d_model=s[1] if s else None, d_ff=f[0] if f else None)


def _vae_dims(shapes):
    s = _find(shapes, "decoder.conv_out.weight")
    return _present(channels=s[1] if s else None)


def _clip_dims(shapes):
    s = _find(shapes, "token_embedding.weight")
    return _present(hidden=s[1] if s else None)


def _qwen_dims(shapes):
    s, f = _find(shapes, "embed_tokens.weight"), _find(shapes, "mlp.gate_proj.weight")
    return _present(hidden=s[1] if s else None, d_ff=f[0] if f else None)


def _decoder_dims(shapes):
    """A Qwen3 / Mistral decoder: width, MLP width, attention heads (q_proj rows / head width, 128 unless a
    q_norm says) and the decoder layers kept."""
    emb, f = _find(shapes, "embed_tokens.weight"), _find(shapes, "mlp.gate_proj.weight")
    q, qn = _find(shapes, "layers.0.self_attn.q_proj.weight"), _find(shapes, "layers.0.self_attn.q_norm.weight")
    layers = {m.group(2) for k in shapes if (m := LAYERS.search(k))}
    heads = q[0] // (qn[0] if qn else 128) if q else None
    return _present(hidden=emb[1] if emb else None, d_ff=f[0] if f else None, heads=heads, layers=len(layers))


def _controlnet_dims(shapes):
    """Its width and how many residuals it returns (one per block, all nets)."""
    s = _find(shapes, "x_embedder.weight")
    outs = sum(1 for k in shapes if re.search(r"(?:^|\.)controlnet_(single_)?blocks\.\d+\.weight$", k))
    return {"hidden": s[0], "outputs": outs} if s else {}


def _siglip_dims(shapes):
    """SigLIP's vision tower: tokens (one per patch, the position table's rows), width and MLP width."""
    pos, f = _find(shapes, "position_embedding.weight"), _find(shapes, "layers.0.mlp.fc1.weight")
    return _present(tokens=pos[0] if pos else None, hidden=pos[1] if pos else None, d_ff=f[0] if f else None)


def _redux_embedder_dims(shapes):
    """Redux's two Linear layers: SigLIP width -> ``d_ff`` -> the T5 width its tokens join."""
    up, down = _find(shapes, "redux_up.weight"), _find(shapes, "redux_down.weight")
    return _present(d_in=up[1] if up else None, d_ff=up[0] if up else None, d_out=down[0] if down else None)


# Widths for ``activations.activation_bytes``; a role not named gets none (its estimate uses its defaults).
DIMS = {
    "dit": _dit_dims, "text_encoder_2": _t5_dims, "vae": _vae_dims, "text_encoder_1": _clip_dims,
    "qwen_vl": _qwen_dims, "nexus_gen": _qwen_dims, "controlnet": _controlnet_dims, "flux_redux_image_encoder": _siglip_dims,
    "flux_redux_image_embedder": _redux_embedder_dims, "ipadapter_image_encoder": _siglip_dims,
    "infinityou_infusenet": _controlnet_dims, "text_encoder": _decoder_dims,
}


def dims_from_shapes(role: str, shapes: Mapping) -> dict:
    return DIMS.get(role, lambda s: {})(shapes)


# --------------------------------------------------------------------------------------------------- sizes
def prod(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _shapes_and_dtypes(tensors: Mapping) -> tuple:
    shapes, dtypes = {}, {}
    for key, info in tensors.items():
        if key == "__metadata__":
            continue
        if isinstance(info, Mapping):
            shapes[key] = tuple(int(d) for d in info["shape"])
            dtypes[key] = dtype_name(info.get("dtype"))
            if "packed_bytes" in info:   # a quantized weight: its logical shape, and its real bytes
                dtypes[key] = ("packed", int(info["packed_bytes"]))
        else:  # a tensor
            shapes[key] = tuple(info.shape)
            dtypes[key] = dtype_name(info.dtype)
    return shapes, dtypes


def _block_sizes(role: str, numel: Mapping, castable: set, packed: Mapping = {}) -> tuple:
    """(params, fp8 params, packed params, packed bytes) per block, double blocks before single ones, by index."""
    blocks: dict = {}
    rx = BLOCKS.get(role)
    for k, n in numel.items():
        m = rx.search(k) if rx else None
        if m:
            b = blocks.setdefault((m.group(1), int(m.group(2))), [0, 0, 0, 0])
            b[0] += n
            b[1] += n if k in castable else 0
            b[2] += n if k in packed else 0
            b[3] += packed.get(k, 0)
    first = {name: i for i, name in enumerate(FIRST_BLOCK_LISTS)}
    order = sorted(blocks, key=lambda bk: (first.get(bk[0], len(first)), bk[1]))
    return tuple(tuple(blocks[b][i] for b in order) for i in range(4))


def main_dtype(counts: Mapping) -> Optional[str]:
    """The dtype holding the most parameters in {dtype: count}."""
    return max(counts, key=counts.get) if counts else None


def sizes_from_tensors(role: str, tensors: Mapping) -> ComponentSize:
    """Sizes from a state-dict description {key: {"shape": [...], "dtype": "BF16"}} (a checkpoint manifest's
    ``tensors`` or a safetensors header) or {key: tensor}."""
    shapes, dtypes = _shapes_and_dtypes(tensors)
    shapes = KEEP.get(role, dict)(shapes)
    packed = {k: dtypes[k][1] for k in shapes if isinstance(dtypes.get(k), tuple)}
    numel = {k: prod(s) for k, s in shapes.items()}
    castable = {k for k, s in shapes.items() if k not in packed and castable_key(role, k, s, shapes)
                and not (k.endswith(".bias") and k[:-5] + ".weight" in packed)}   # a quantized layer stays as is
    blocks, block_fp8, block_pn, block_pb = _block_sizes(role, numel, castable, packed)
    layers: dict = {}
    for k in castable:
        layers[k.rsplit(".", 1)[0]] = layers.get(k.rsplit(".", 1)[0], 0) + numel[k]
    counts: dict = {}
    for k, n in numel.items():
        d = "packed" if k in packed else dtypes.get(k)
        counts[d] = counts.get(d, 0) + n
    return ComponentSize(role=role, params=sum(numel.values()), fp8_params=sum(numel[k] for k in castable),
                         blocks=blocks, block_fp8=block_fp8, largest_layer=max(layers.values(), default=0),
                         file_dtype=main_dtype(counts), dims=dims_from_shapes(role, shapes),
                         packed_params=sum(numel[k] for k in packed), packed_bytes=sum(packed.values()),
                         block_packed_params=block_pn if packed else (), block_packed=block_pb if packed else ())


def sizes_from_manifests(paths: Mapping) -> dict:
    """{role: manifest json path(s)} -> {role: ComponentSize}; several paths (shards) are merged."""
    import json
    out = {}
    for role, p in paths.items():
        tensors = {}
        for path in (p if isinstance(p, (list, tuple)) else [p]):
            with open(path, encoding="utf-8") as f:
                tensors.update(json.load(f)["tensors"])
        out[role] = sizes_from_tensors(role, tensors)
    return out


def sizes_from_files(files_by_role: Mapping) -> dict:
    """{role: [safetensors files]} -> {role: ComponentSize}, from the headers alone (no tensor data is read)."""
    from ..loading.files import read_header
    from ..loading.quantized import describe_file_or_none
    out = {}
    for role, files in files_by_role.items():
        tensors = {}
        for path in files:   # a GGUF / 4-bit / fp8 file: logical shapes and real bytes
            tensors.update(describe_file_or_none(path) or read_header(path))
        out[role] = sizes_from_tensors(role, tensors)
    return out


def _file_dtype(module) -> Optional[str]:
    """The dtype most of a loaded module's files hold (remembered on the module: headers are read once)."""
    file_dtype = getattr(module, "flux_studio_file_dtype", None)
    files = getattr(module, "flux_studio_files", None)
    if file_dtype is not None or not files:
        return file_dtype
    try:
        from ..loading.files import read_header
        counts: dict = {}
        for path in files:
            for info in read_header(path).values():
                d = dtype_name(info["dtype"])
                counts[d] = counts.get(d, 0) + prod(info["shape"])
        file_dtype = main_dtype(counts)
    except Exception:  # noqa: BLE001 - a guess only; the file may have moved
        file_dtype = None
    try:
        module.flux_studio_file_dtype = file_dtype
    except Exception:  # noqa: BLE001
        pass
    return file_dtype


def sizes_from_module(role: str, module) -> ComponentSize:
    """Exact sizes of a loaded (or meta-device) module, with the same fp8 and block rules the placement applies."""
    from .layers import fp8_layers, stream_blocks
    # a non-floating parameter is a quantized file's weight kept packed (engine.loading.quantized): its real bytes,
    # and as parameters the logical count of the weight it holds (``quant_shape``; 0 for scales and tables)
    packed = {id(p): p.numel() * p.element_size() for p in module.parameters() if not p.is_floating_point()}
    logical = {id(p): prod(getattr(p, "quant_shape", ())) if hasattr(p, "quant_shape") else 0
               for p in module.parameters() if id(p) in packed}

    def count(p):
        return logical[id(p)] if id(p) in packed else p.numel()

    params = {id(p): p for p in module.parameters()}
    castable_ids = {}
    largest = 0
    for _name, layer in fp8_layers(role, module):
        if any(id(p) in packed for p in layer.parameters()):
            continue                                      # a quantized layer stays as it is
        n = 0
        for p in layer.parameters():
            castable_ids[id(p)] = p
            n += p.numel()
        largest = max(largest, n)
    blocks, block_fp8, block_pn, block_pb = [], [], [], []
    for blk in stream_blocks(role, module):
        ps = {id(p): p for p in blk.parameters()}
        blocks.append(sum(count(p) for p in ps.values()))
        block_fp8.append(sum(p.numel() for i, p in ps.items() if i in castable_ids))
        block_pn.append(sum(logical.get(i, 0) for i in ps))
        block_pb.append(sum(packed.get(i, 0) for i in ps))
    shapes = {n: tuple(getattr(p, "quant_shape", None) or p.shape) for n, p in module.named_parameters()}
    return ComponentSize(role=role, params=sum(count(p) for p in params.values()),
                         fp8_params=sum(p.numel() for p in castable_ids.values()), blocks=tuple(blocks),
                         block_fp8=tuple(block_fp8), largest_layer=largest, file_dtype=_file_dtype(module),
                         dims=dims_from_shapes(role, shapes), packed_params=sum(logical.values()),
                         packed_bytes=sum(packed.values()), block_packed_params=tuple(block_pn) if packed else (),
                         block_packed=tuple(block_pb) if packed else ())
