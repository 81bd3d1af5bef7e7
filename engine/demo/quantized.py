"""Quantized transformer files written the way the community tools write them, for tests and demos.

- ``write_gguf`` — the ``gguf`` package's ``GGUFWriter`` (as city96's converter): BFL keys, 2-D weights in the
  chosen block type, 1-D tensors in F32. Q8_0 (and the other legacy types) are quantised by ``gguf.quants``; the
  package has no quantiser for the K types (llama.cpp's C tool makes those), so Q4_K / Q5_K are encoded here by a
  plain min/max fit into ggml's block layout (read back by ``gguf.quants.dequantize`` in the tests). A row whose
  length is not a whole number of blocks is written F16, as converters fall back for such rows.
- ``write_nf4`` — ``bitsandbytes.functional.quantize_4bit`` and ``QuantState.as_dict(packed=True)`` under
  ``<layer>.weight.*``: exactly what ``Linear4bit._save_to_state_dict`` (and so Forge's NF4 files) hold.
- ``write_fp8`` — float8_e4m3fn blocks as ComfyUI writes them: unscaled, or with a per-tensor scale (amax / 448)
  as ``scale_weight`` + the ``scaled_fp8`` marker (older files) or ``weight_scale`` + ``comfy_quant`` (newer).
"""
from __future__ import annotations

import json
import pathlib

import numpy as np

QK_K = 256


def _np(t):
    import torch
    return t.detach().to(torch.float32).cpu().numpy()


# ------------------------------------------------------------------------------------------------------ K-quants
def _pack_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """ggml's 12-byte packing of eight 6-bit scales and eight 6-bit mins (see gguf.quants.Q4_K.get_scale_min)."""
    out = np.empty((sc.shape[0], 12), np.uint8)
    out[:, 0:4] = (sc[:, 0:4] & 63) | ((sc[:, 4:8] >> 4) << 6)
    out[:, 4:8] = (m[:, 0:4] & 63) | ((m[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:8] & 0x0F) | ((m[:, 4:8] & 0x0F) << 4)
    return out


def quantize_k(w: np.ndarray, bits: int) -> np.ndarray:
    """Q4_K (bits=4) / Q5_K (bits=5) blocks of a float matrix whose rows are whole 256-value super-blocks:
    x ~ d*sc*q - dmin*m per 32-value sub-block, q in [0, 2**bits)."""
    rows = w.shape[0]
    x = w.astype(np.float32).reshape(-1, 8, 32)
    qmax = (1 << bits) - 1
    lo = np.minimum(x.min(-1), 0.0)
    scale, mins = (x.max(-1) - lo) / qmax, -lo
    d = (scale.max(-1) / 63).astype(np.float16)
    dmin = (mins.max(-1) / 63).astype(np.float16)
    df, dmf = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(df > 0, np.clip(np.ceil(scale / df), 0, 63), 0).astype(np.uint8)
        m = np.where(dmf > 0, np.clip(np.round(mins / dmf), 0, 63), 0).astype(np.uint8)
        step, off = (df * sc)[..., None], (dmf * m)[..., None]
        q = np.where(step > 0, np.clip(np.round((x + off) / step), 0, qmax), 0).astype(np.uint8)
    lo4 = q & 0x0F
    qs = (lo4[:, 0::2, :] | (lo4[:, 1::2, :] << 4)).reshape(-1, 128)     # sub-blocks 2c (low), 2c+1 (high)
    parts = [d.reshape(-1, 1).view(np.uint8), dmin.reshape(-1, 1).view(np.uint8), _pack_scales(sc, m)]
    if bits == 5:
        qh = np.zeros((q.shape[0], 32), np.uint8)
        for j in range(8):
            qh |= ((q[:, j, :] >> 4) & 1) << j
        parts.append(qh)
    parts.append(qs)
    return np.concatenate(parts, axis=1).reshape(rows, -1)


def quantize_gguf(w: np.ndarray, type_name: str):
    """(data, GGMLQuantizationType) for one matrix; rows that are not whole blocks fall back to F16."""
    import gguf
    T = gguf.GGMLQuantizationType
    qt = T[type_name]
    block, _size = gguf.GGML_QUANT_SIZES[qt]
    if w.ndim != 2 or w.shape[1] % block:
        return w.astype(np.float16), T.F16
    if type_name in ("Q4_K", "Q5_K"):
        return quantize_k(w, 4 if type_name == "Q4_K" else 5), qt
    return gguf.quants.quantize(w.astype(np.float32), qt), qt


def write_gguf(sd: dict, path, type_name: str = "Q8_0") -> pathlib.Path:
    """A GGUF file of a BFL transformer state dict (torch tensors): 2-D weights in ``type_name``, the rest F32."""
    import gguf
    path = pathlib.Path(path)
    writer = gguf.GGUFWriter(str(path), "flux")
    for key, t in sd.items():
        w = _np(t)
        if w.ndim == 2 and key.endswith(".weight"):
            data, qt = quantize_gguf(w, type_name)
            writer.add_tensor(key, data, raw_shape=data.shape, raw_dtype=qt)
        else:
            writer.add_tensor(key, w.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# ---------------------------------------------------------------------------------------------- bitsandbytes NF4
# bitsandbytes' NF4 levels (QLoRA's normal-float 4-bit table), as its ``quant_map`` holds them.
NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0)


def nf4_reference(t, blocksize: int = 64) -> dict:
    """bitsandbytes' published NF4 quantisation without bitsandbytes: per block absmax, nearest level, two codes
    per byte (first in the high nibble); returns the tensors ``QuantState.as_dict(packed=True)`` gives (no double
    quantisation), with the packed weight under ``""``."""
    import torch
    code = torch.tensor(NF4_CODE, dtype=torch.float32)
    flat = t.to(torch.float32).reshape(-1)
    blocks = flat.reshape(-1, blocksize)          # the demo's and FLUX's matrices are whole blocks
    absmax = blocks.abs().amax(-1)
    scaled = (blocks / absmax.clamp(min=1e-38)[:, None]).clamp(-1, 1).reshape(-1)
    q = torch.bucketize(scaled, (code[1:] + code[:-1]) / 2).to(torch.uint8)
    packed = ((q[0::2] << 4) | q[1::2]).unsqueeze(1)
    state = {"quant_type": "nf4", "blocksize": blocksize, "dtype": str(t.dtype).replace("torch.", ""),
             "shape": list(t.shape)}
    return {"": packed, "absmax": absmax, "quant_map": code, "quant_state.bitsandbytes__nf4": _json_tensor(state)}


def _bnb_state_dict(t, blocksize, double_quant) -> dict:
    import bitsandbytes.functional as bnbf
    packed, state = bnbf.quantize_4bit(t, blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant)
    return {"": packed, **state.as_dict(packed=True)}


def write_nf4(sd: dict, path, double_quant: bool = False, prefix: str = "model.diffusion_model.",
              blocksize: int = 64, use_bitsandbytes: bool = True) -> pathlib.Path:
    """NF4 of every 2-D weight, saved as bitsandbytes' ``Linear4bit`` saves it (Forge's file layout): quantised by
    bitsandbytes (``use_bitsandbytes``) or by ``nf4_reference`` (same bytes; no double quantisation)."""
    import torch
    from safetensors.torch import save_file
    out = {}
    for key, t in sd.items():
        if t.dim() == 2 and key.endswith(".weight"):
            t = t.to(torch.bfloat16)
            parts = _bnb_state_dict(t, blocksize, double_quant) if use_bitsandbytes else nf4_reference(t, blocksize)
            for k, v in parts.items():
                out[f"{prefix}{key}.{k}" if k else prefix + key] = v
        else:
            out[prefix + key] = t.to(torch.bfloat16)
    save_file({k: v.contiguous() for k, v in out.items()}, str(path))
    return pathlib.Path(path)


# --------------------------------------------------------------------------------------------------------- fp8
def _json_tensor(obj):
    import torch
    return torch.tensor(list(json.dumps(obj).encode("utf-8")), dtype=torch.uint8)


def write_fp8(sd: dict, path, scaled: str | None = None, prefix: str = "") -> pathlib.Path:
    """The blocks' matrices in float8_e4m3fn, the rest bf16. ``scaled``: None (plain cast), "scale_weight"
    (ComfyUI's older scaled files, with the ``scaled_fp8`` marker) or "weight_scale" (newer, with ``comfy_quant``)."""
    import torch
    from safetensors.torch import save_file
    fp8 = torch.float8_e4m3fn
    out = {}
    for key, t in sd.items():
        in_blocks = key.startswith(("double_blocks.", "single_blocks."))
        if not (in_blocks and t.dim() == 2 and key.endswith(".weight")):
            out[prefix + key] = t.to(torch.bfloat16)
            continue
        base = prefix + key[:-len(".weight")]
        if scaled is None:
            out[prefix + key] = t.to(fp8)
            continue
        scale = (t.float().abs().max() / torch.finfo(fp8).max).clamp(min=1e-12)
        out[prefix + key] = (t.float() / scale).clamp(-448, 448).to(fp8)
        out[f"{base}.{scaled}"] = scale.reshape(()).to(torch.float32)
        if scaled == "weight_scale":
            out[f"{base}.comfy_quant"] = _json_tensor({"format": "float8_e4m3fn"})
    if scaled == "scale_weight":
        out["scaled_fp8"] = torch.empty(0, dtype=fp8)
    save_file({k: v.contiguous() for k, v in out.items()}, str(path))
    return pathlib.Path(path)
