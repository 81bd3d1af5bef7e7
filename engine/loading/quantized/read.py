"""Reading quantized transformer files: GGUF, bitsandbytes 4-bit (Forge's NF4) and fp8 safetensors (ComfyUI's).

``file_kind(group)`` tells the format from the file itself (GGUF's magic bytes; the safetensors header's keys and
dtypes), never from its name. ``read_tensors(group)`` gives {key: tensor or quantized matrix} with the side tensors
(absmax, quant_map, scales, ...) folded into their weight, so the keys are the plain BFL / diffusers names.
``describe(group)`` gives the same from the headers alone: logical shapes and each weight's real bytes.

Layouts (learned from the writers, see docs in each branch):

- GGUF (city96's FLUX files; the ``gguf`` package's GGUFWriter): BFL keys, 2-D weights in a block type (Q8_0,
  Q5_K, Q4_K, ...), the rest F32/F16/BF16. Shapes are stored innermost first (ggml's ``ne``) and reversed here.
  Read through ``gguf.GGUFReader``'s memory map: no tensor data is read until used.
- bitsandbytes 4-bit (``Linear4bit._save_to_state_dict``, what Forge's ``flux1-dev-bnb-nf4*.safetensors`` hold):
  ``<layer>.weight`` uint8 [n/2, 1] + ``<layer>.weight.absmax`` + ``.quant_map`` (+ ``.nested_absmax``,
  ``.nested_quant_map`` when double-quantised) + ``.quant_state.bitsandbytes__nf4``: a uint8 tensor holding JSON
  (quant_type, blocksize, dtype, shape, nested_blocksize, nested_offset). Parsed as JSON: nothing is unpickled.
- fp8: ``<layer>.weight`` float8_e4m3fn / e5m2, with no scale (Kijai's flux1-dev-fp8), or ComfyUI's scaled files:
  ``<layer>.scale_weight`` + a ``scaled_fp8`` marker (older), or ``<layer>.weight_scale`` (+ ``input_scale``,
  ``comfy_quant`` JSON naming the format; newer). Input scales only matter for fp8 activations and are ignored.
"""
from __future__ import annotations

import json
import warnings

import torch

from ..errors import ModelFileError, few
from .tensors import QFP8, QGGUF, QNF4

GGUF_MAGIC = b"GGUF"
BNB_STATE = ".quant_state.bitsandbytes__"
BNB_AUX = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")
FP8_SCALES = (".scale_weight", ".weight_scale")
FP8_IGNORED = (".scale_input", ".input_scale", ".comfy_quant")
FP8_MARKER = "scaled_fp8"
FP8_DTYPES = ("F8_E4M3", "F8_E5M2")
FP8_NAMES = {"F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def is_gguf(path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def is_aux_key(key: str) -> bool:
    """A side tensor of a quantized weight (not a weight of its own)."""
    return (key == FP8_MARKER or BNB_STATE in key or key.endswith(BNB_AUX) or key.endswith(FP8_SCALES)
            or key.endswith(FP8_IGNORED) or key.endswith((".weight_scale_2", ".pre_quant_scale")))


def header_kind(header: dict) -> str | None:
    """"nf4" (bitsandbytes 4-bit), "fp8" (fp8 matrices, scaled or not) or None, from a safetensors header."""
    if any(BNB_STATE in k for k in header):
        return "nf4"
    if any(info.get("dtype") in FP8_DTYPES and len(info.get("shape", ())) == 2 for info in header.values()
           if isinstance(info, dict)):
        return "fp8"
    if any(k.endswith(FP8_SCALES) for k in header):
        return "fp8"                      # scales beside int8 / other weights: refused by name when read
    return None


def file_kind(group) -> str | None:
    """"gguf", "nf4", "fp8" or None (a plain file) for a FileGroup."""
    from ..files import read_headers
    files = list(group.files)
    if any(is_gguf(p) for p in files):
        if len(files) > 1:
            raise ModelFileError(f"{group.label}: a GGUF transformer is one file; pass it alone.", group.label)
        return "gguf"
    _, where = read_headers(group)
    return header_kind({k: info for k, (_p, info) in where.items()})


# --------------------------------------------------------------------------------------------------------- GGUF
def supported_gguf_types() -> list[str]:
    from diffusers.quantizers.gguf.utils import SUPPORTED_GGUF_QUANT_TYPES
    return ["F32", "F16", "BF16"] + sorted(t.name for t in SUPPORTED_GGUF_QUANT_TYPES)


def _gguf_reader(path):
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - a pinned requirement
        raise ModelFileError(f"{path} is a GGUF file; reading it needs the `gguf` package (pip install gguf).",
                             path) from e
    try:
        return gguf, gguf.GGUFReader(str(path))
    except Exception as e:
        raise ModelFileError(f"{path} starts like a GGUF file but could not be read ({type(e).__name__}: {e}): it is "
                             f"corrupt or truncated. Download it again.", path) from e


def _gguf_entries(path):
    """[(key, logical shape, type name, tensor-reader entry)] with unsupported block types refused by name."""
    gguf, reader = _gguf_reader(path)
    ok = set(supported_gguf_types())
    out, bad = [], {}
    for t in reader.tensors:
        name = gguf.GGMLQuantizationType(t.tensor_type).name
        if name not in ok:
            bad.setdefault(name, []).append(t.name)
        out.append((t.name, torch.Size(int(d) for d in reversed(t.shape.tolist())), name, t))
    if bad:
        kinds = "; ".join(f"{k} ({few(v, 2)})" for k, v in sorted(bad.items()))
        raise ModelFileError(f"{path} uses GGUF types this loader cannot dequantise: {kinds}. Supported: "
                             f"{', '.join(supported_gguf_types())}. Use a file quantised to one of those.", path)
    return gguf, out


def _gguf_tensor(gguf, shape, type_name, entry):
    with warnings.catch_warnings():  # the memory map is read-only and stays so: nothing writes to these tensors
        warnings.simplefilter("ignore", UserWarning)
        data = torch.from_numpy(entry.data)
    if type_name in ("F32", "F16"):
        return data.reshape(shape)
    if type_name == "BF16":
        return data.reshape(-1).view(torch.uint8).view(torch.bfloat16).reshape(shape)
    return QGGUF(data=data.view(torch.uint8).reshape(shape[0] if len(shape) > 1 else 1, -1),
                 qtype=int(gguf.GGMLQuantizationType[type_name]), shape=shape)


def read_gguf(path) -> dict:
    gguf, entries = _gguf_entries(path)
    return {key: _gguf_tensor(gguf, shape, tname, e) for key, shape, tname, e in entries}


def describe_gguf(path) -> dict:
    _gguf, entries = _gguf_entries(path)
    out = {}
    for key, shape, tname, e in entries:
        if tname in ("F32", "F16", "BF16"):
            out[key] = {"shape": list(shape), "dtype": tname}
        else:
            out[key] = {"shape": list(shape), "dtype": tname, "packed_bytes": int(e.n_bytes)}
    return out


# ------------------------------------------------------------------------------------------ bitsandbytes 4-bit
def _bnb_state(key: str, t: torch.Tensor, where) -> dict:
    try:
        return json.loads(bytes(t.reshape(-1).to(torch.uint8).tolist()).decode("utf-8"))
    except Exception as e:
        raise ModelFileError(f"{where}: {key} is not bitsandbytes' packed JSON quant state ({e}): the file is "
                             f"corrupt.", where) from e


def _bnb_absmax(sd, base, state, where) -> torch.Tensor:
    absmax = sd[base + ".absmax"]
    if base + ".nested_absmax" not in sd:
        return absmax.to(torch.float32)
    # double quantisation: the absmax are 8-bit codes in blocks of nested_blocksize, shifted by nested_offset
    code, scale = sd[base + ".nested_quant_map"].float(), sd[base + ".nested_absmax"].float()
    nb = int(state["nested_blocksize"])
    values = code[absmax.reshape(-1).long()] * scale.repeat_interleave(nb)[:absmax.numel()]
    return values + float(state["nested_offset"])


def _bnb_weights(sd: dict, where) -> dict:
    out = {k: v for k, v in sd.items() if not is_aux_key(k)}
    for key in [k for k in sd if BNB_STATE in k]:
        base = key[:key.index(BNB_STATE)]
        state = _bnb_state(key, sd[key], where)
        qt = str(state.get("quant_type", key.rsplit("__", 1)[-1]))
        if qt not in ("nf4", "fp4"):
            raise ModelFileError(f"{where}: {base} is bitsandbytes {qt!r}; supported: nf4, fp4.", where)
        missing = [base + s for s in ("", ".absmax", ".quant_map") if base + s not in sd]
        if missing:
            raise ModelFileError(f"{where}: the 4-bit weight {base} lacks {few(missing)}: the file is incomplete.",
                                 where)
        out[base] = QNF4(packed=sd[base], absmax=_bnb_absmax(sd, base, state, where), code=sd[base + ".quant_map"],
                         blocksize=int(state["blocksize"]), shape=torch.Size(state["shape"]), quant_type=qt,
                         dtype=_state_dtype(state, where))
    return out


def _state_dtype(state, where) -> torch.dtype:
    name = str(state.get("dtype", "float32"))
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ModelFileError(f"{where}: a 4-bit quant state names dtype {name!r}, not a float type.", where)
    return dtype


# ---------------------------------------------------------------------------------------------------------- fp8
def _comfy_format(sd, base, where) -> None:
    fmt_t = sd.get(base + ".comfy_quant")
    if fmt_t is None:
        return
    fmt = str(_bnb_state(base + ".comfy_quant", fmt_t, where).get("format", "?"))
    if fmt not in ("float8_e4m3fn", "float8_e5m2"):
        raise ModelFileError(f"{where}: {base}.weight is ComfyUI quant format {fmt!r}; supported here: "
                             f"float8_e4m3fn and float8_e5m2 (with or without a per-tensor scale).", where)


def _fp8_weights(sd: dict, where) -> dict:
    out = {k: v for k, v in sd.items() if not is_aux_key(k)}
    for key, t in list(out.items()):
        base = key[:-len(".weight")] if key.endswith(".weight") else None
        scale = next((sd[base + s] for s in FP8_SCALES if base and base + s in sd), None)
        is_fp8 = t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
        if scale is not None and not is_fp8:
            raise ModelFileError(f"{where}: {key} is {str(t.dtype).replace('torch.', '')} with a scale (a ComfyUI "
                                 f"int8 / block-scaled layout); supported: float8_e4m3fn / float8_e5m2 weights with "
                                 f"or without a per-tensor scale.", where)
        if not is_fp8 or t.dim() != 2:
            continue
        if base:
            _comfy_format(sd, base, where)
        if scale is not None and scale.numel() not in (1, t.shape[0]):
            raise ModelFileError(f"{where}: {key} has a scale of shape {list(scale.shape)} (block-wise); supported: "
                                 f"one scale per tensor or per row.", where)
        out[key] = QFP8(data=t, scale=None if scale is None else scale.to(torch.float32))
    return out


# ----------------------------------------------------------------------------------------------------- entry points
def read_tensors(group, kind: str) -> dict:
    """{key: tensor or Q*} of a quantized group (memory-mapped; nothing is copied but small side tensors)."""
    from ..files import read_state_dict
    if kind == "gguf":
        return read_gguf(group.files[0])
    sd = read_state_dict(group)
    return _bnb_weights(sd, group.label) if kind == "nf4" else _fp8_weights(sd, group.label)


def describe(group, kind: str) -> dict:
    """{key: {"shape": logical, "dtype", "packed_bytes"?}} from the headers alone (GGUF: its tensor table)."""
    if kind == "gguf":
        return describe_gguf(group.files[0])
    from ..files import read_headers
    _g, where = read_headers(group)
    header = {k: info for k, (_p, info) in where.items()}
    if kind == "nf4":  # the logical shapes are in the JSON states: read those few bytes
        return _describe_nf4(group, header)
    out = {}
    for k, info in header.items():
        if is_aux_key(k):
            continue
        out[k] = dict(info)
        if info["dtype"] in FP8_DTYPES and len(info["shape"]) == 2:
            base = k[:-len(".weight")]
            extra = sum(_numel(header[base + s]["shape"]) * 4 for s in FP8_SCALES if base + s in header)
            out[k]["packed_bytes"] = _numel(info["shape"]) + extra
            out[k]["dtype"] = FP8_NAMES[info["dtype"]] + (" scaled" if extra else "")
    return out


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _describe_nf4(group, header) -> dict:
    from safetensors import safe_open
    from ..files import ITEMSIZE, read_headers
    _g, where = read_headers(group)
    out = {k: dict(v) for k, v in header.items() if not is_aux_key(k)}
    for key, (path, _info) in where.items():
        if BNB_STATE not in key:
            continue
        base = key[:key.index(BNB_STATE)]
        with safe_open(str(path), framework="pt", device="cpu") as f:
            state = _bnb_state(key, f.get_tensor(key), group.label)
        side = sum(_numel(header[base + s]["shape"]) * ITEMSIZE[header[base + s]["dtype"]]
                   for s in BNB_AUX if base + s in header)
        out[base] = {"shape": list(state["shape"]), "dtype": "NF4" if state.get("quant_type") != "fp4" else "FP4",
                     "packed_bytes": _numel(header[base]["shape"]) * ITEMSIZE[header[base]["dtype"]] + side}
    return out


def describe_file_or_none(path) -> dict | None:
    """``describe`` for one file when it is quantized, else None (the planner's header path)."""
    from ..files import resolve_group
    g = resolve_group(path)
    kind = file_kind(g)
    return None if kind is None else describe(g, kind)


def logical_meta(desc: dict) -> dict:
    """Meta tensors of the logical shapes (what detection and the architecture inference read)."""
    return {k: torch.empty(v["shape"], dtype=torch.float32 if "packed_bytes" in v else _dtype(v["dtype"]),
                           device="meta") for k, v in desc.items()}


def _dtype(name):
    from ..files import DTYPES
    return DTYPES.get(name, {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}.get(name,
                                                                                                   torch.float32))


def summary(desc: dict) -> str:
    """"GGUF Q4_K (304 tensors), F32 (...)" style: how the weights are stored."""
    counts: dict = {}
    for v in desc.values():
        if "packed_bytes" in v:
            counts[v["dtype"]] = counts.get(v["dtype"], 0) + 1
    return ", ".join(f"{k} x{n}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1]))


__all__ = ["file_kind", "read_tensors", "describe", "describe_file_or_none", "logical_meta", "summary", "is_gguf",
           "is_aux_key", "header_kind", "supported_gguf_types"]
