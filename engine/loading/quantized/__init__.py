"""Community checkpoint formats for the FLUX transformer: GGUF, bitsandbytes 4-bit (Forge's NF4), fp8 (ComfyUI's).

- ``read``: which format a file is (from its bytes and header), its tensors with side tensors folded into their
  weights, and its description from the headers (logical shapes, real bytes) for detection and the planner
- ``tensors``: the quantized matrices (row ranges, joins, dequantisation)
- ``layers``: Linear layers that keep the weight quantized and dequantise per call
- ``load``: the transformer from such a file

``load.load_models`` sends a transformer file here when ``file_kind`` names a format; other components in these
formats are refused by name.
"""
from .layers import PackedLinear, dequantize_module_weight, quantized_linear
from .load import assemble_quantized, load_quantized_flux2_transformer, load_quantized_transformer
from .read import describe, describe_file_or_none, file_kind, is_aux_key, is_gguf, logical_meta, read_tensors, summary
from .read import supported_gguf_types
from .tensors import QFP8, QGGUF, QNF4, QTensor

FORMAT_NAMES = {"gguf": "GGUF", "nf4": "bitsandbytes 4-bit", "fp8": "fp8"}


def storage_note(kind: str, desc: dict) -> str:
    """"stored as GGUF: Q4_K x304" — what detection adds to a quantized file's description."""
    return f"stored as {FORMAT_NAMES.get(kind, kind)}: {summary(desc)}"


__all__ = ["file_kind", "describe", "describe_file_or_none", "logical_meta", "read_tensors", "summary",
           "storage_note", "load_quantized_transformer", "load_quantized_flux2_transformer", "read_meta", "assemble_quantized", "quantized_linear", "PackedLinear",
           "dequantize_module_weight", "supported_gguf_types", "is_aux_key", "is_gguf", "QTensor", "QGGUF", "QNF4", "QFP8",
           "FORMAT_NAMES"]


def read_meta(group):
    """(kind, logical meta state dict, storage note) of a quantized group, or (None, None, "") for a plain one."""
    kind = file_kind(group)
    if kind is None:
        return None, None, ""
    desc = describe(group, kind)
    return kind, logical_meta(desc), storage_note(kind, desc)


def refuse_role(group, kind: str, name: str) -> bool:
    """A quantized file of a component other than the transformer: a plain fp8 file (no scales) loads as before,
    cast to the compute dtype (returns False); anything else is refused by name."""
    from ..errors import ModelFileError
    if kind == "fp8" and not any(is_aux_key(k) for k in _header_keys(group)):
        return False
    raise ModelFileError(f"{group.label} is a {FORMAT_NAMES.get(kind, kind)} file of {name}: only the FLUX.1 and "
                         f"FLUX.2 transformers are loaded from GGUF / 4-bit / scaled-fp8 files. Use the .safetensors "
                         f"release of this component.", group.label)


def _header_keys(group):
    from ..files import read_headers
    return read_headers(group)[1].keys()
