"""Quantized transformer files written the way the community tools write them, for tests and demos.

- ``write_gguf`` — the ``gguf`` package's ``GGUFWriter`` (as city96's converter): BFL keys, 2-D weights in the
  chosen block type, 1-D tensors in F32. Q8_0 (and the other legacy types) are quantised by ``gguf.quants``; the
  package has no quantiser for the K types (llama.cpp's C tool makes those), so Q4_K / Q5_K are encoded here by a
  plain min/max fit into ggml's block layout (read back by ``gguf.quants.dequantize`` in the tests). A row whose
  length is not a whole number of blocks is written F16, as converters fall back for such rows.
- ``write_nf4`` — bitsandbytes' ``quantize_4bit`` (plain or ``compress_statistics``, i.e. double-quantised) and
  ``QuantState.as_dict(packed=True)`` under ``<layer>.weight.*``: exactly what ``Linear4bit._save_to_state_dict``
  (and so Forge's NF4 files) hold, computed here by the published algorithm (``nf4_reference``, byte-identical to
  bitsandbytes 0.50, which is not a requirement) or, optionally, by bitsandbytes itself.
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
NESTED_BLOCKSIZE = 256      # quantize_4bit(compress_statistics=True) quantises the absmax in blocks of 256


def dynamic_map():
    """bitsandbytes' signed 8-bit "dynamic" code (``create_dynamic_map()``'s defaults, Dettmers 2015): for each
    decade 10**(i-6), i = 0..6, the midpoints of 2**i + 1 float32 steps from 0.1 to 1, both signs; plus 0 and 1;
    sorted (256 values, -0.993 .. 1)."""
    import torch
    values = [0.0, 1.0]
    for i in range(7):
        steps = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        mids = (steps[:-1] + steps[1:]) / 2.0
        values += ((10 ** (i - 6)) * mids).tolist() + (-(10 ** (i - 6)) * mids).tolist()   # float32 products
    return torch.tensor(sorted(values), dtype=torch.float32)


LUT_SIZE = 65536


def _code_lut(code):
    """The code index for each of 65536 evenly spaced values -1 + 2i/65535 (float32): the number of midpoints
    between neighbouring code values that lie below it, i.e. the nearest code value (ties go down)."""
    import torch
    mids = 0.5 * (code[:-1] + code[1:])
    grid = -1.0 + (2.0 * torch.arange(LUT_SIZE, dtype=torch.float32)) / float(LUT_SIZE - 1)
    return torch.searchsorted(mids, grid, right=False).to(torch.uint8)


def quantize_blockwise_8bit(x, code, blocksize: int = NESTED_BLOCKSIZE):
    """(codes uint8, absmax float32 per block) as bitsandbytes 0.50's CPU ``quantize_blockwise`` makes them: each
    value times 1/absmax of its block (float32), clamped to [-1, 1], read through a 65536-entry table of nearest
    code indices at floor((v + 1) * 0.5 * 65535 + 0.5), the multiply-add rounded once as its FMA build does.
    A block whose absmax is 0 gets index 0. A last partial block has its own absmax."""
    import torch
    x = x.to(torch.float32).reshape(-1)
    n = x.numel()
    blocks = torch.nn.functional.pad(x, (0, -n % blocksize)).reshape(-1, blocksize)   # zero padding: same absmax
    absmax = blocks.abs().amax(-1)
    inv = 1.0 / absmax
    normed = (blocks * inv[:, None]).clamp(-1.0, 1.0)
    half = (normed + 1.0) * 0.5
    pos = (half.double() * float(LUT_SIZE - 1) + 0.5).float()       # exact in float64, then one float32 rounding
    q = _code_lut(code)[pos.floor().long().clamp(0, LUT_SIZE - 1)]
    q = torch.where((absmax == 0)[:, None], torch.zeros_like(q), q)
    return q.reshape(-1)[:n], absmax


def nf4_reference(t, blocksize: int = 64, double_quant: bool = False) -> dict:
    """bitsandbytes' published NF4 quantisation without bitsandbytes (``quantize_4bit(quant_type="nf4")``): per block
    absmax, nearest level, two codes per byte (first in the high nibble). ``double_quant``
    (``compress_statistics=True``): the absmax less their mean (``nested_offset``) quantised to the 8-bit dynamic
    code in blocks of 256. Returns the tensors ``QuantState.as_dict(packed=True)`` gives, with the packed weight
    under ``""``: the same bytes as bitsandbytes 0.50.2 on the CPU (tests/test_quantized_checkpoints.py's golden
    file); its CUDA kernels may pick a neighbouring 8-bit code for a few nested absmax."""
    import torch
    code = torch.tensor(NF4_CODE, dtype=torch.float32)
    flat = t.to(torch.float32).reshape(-1)
    if flat.numel() % blocksize:
        raise ValueError(f"nf4_reference: {flat.numel()} values are not whole {blocksize}-value blocks; use a "
                         f"matrix whose size is a multiple of {blocksize} (FLUX's are) or bitsandbytes itself.")
    blocks = flat.reshape(-1, blocksize)
    absmax = blocks.abs().amax(-1)
    scaled = (blocks / absmax.clamp(min=1e-38)[:, None]).clamp(-1, 1).reshape(-1)
    q = torch.bucketize(scaled, (code[1:] + code[:-1]) / 2).to(torch.uint8)
    packed = ((q[0::2] << 4) | q[1::2]).unsqueeze(1)
    state = {"quant_type": "nf4", "blocksize": blocksize, "dtype": str(t.dtype).replace("torch.", ""),
             "shape": list(t.shape)}
    if not double_quant:
        return {"": packed, "absmax": absmax, "quant_map": code, "quant_state.bitsandbytes__nf4": _json_tensor(state)}
    offset = absmax.mean()
    code8 = dynamic_map()
    qabsmax, nested_absmax = quantize_blockwise_8bit(absmax - offset, code8)
    # the JSON's key order is bitsandbytes' (as_dict): the state tensor's bytes depend on it
    state.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=offset.item())
    return {"": packed, "absmax": qabsmax, "quant_map": code, "nested_absmax": nested_absmax,
            "nested_quant_map": code8, "quant_state.bitsandbytes__nf4": _json_tensor(state)}


def nf4_dequantize_reference(parts: dict):
    """bitsandbytes' ``dequantize_4bit`` for the tensors ``nf4_reference`` (or bitsandbytes) writes: a nested absmax
    is nested code[q] * its block's absmax + offset (float32); each value is code[nibble] * its block's absmax
    (float32), high nibble first, then cast to the state's dtype."""
    import torch
    state = json.loads(bytes(parts["quant_state.bitsandbytes__nf4"].tolist()).decode("utf-8"))
    absmax = parts["absmax"]
    if "nested_absmax" in parts:
        nb = int(state["nested_blocksize"])
        scale = parts["nested_absmax"].repeat_interleave(nb)[:absmax.numel()]
        absmax = parts["nested_quant_map"][absmax.reshape(-1).long()] * scale
        absmax = absmax + torch.tensor(float(state["nested_offset"]), dtype=torch.float32)
    flat = parts[""].reshape(-1)
    idx = torch.stack([flat >> 4, flat & 0x0F], 1).reshape(-1).long()
    n = int(np.prod(state["shape"]))
    values = parts["quant_map"][idx[:n]] * absmax.float().repeat_interleave(int(state["blocksize"]))[:n]
    return values.reshape(state["shape"]).to(getattr(torch, state["dtype"]))


def _bnb_state_dict(t, blocksize, double_quant) -> dict:
    import bitsandbytes.functional as bnbf
    packed, state = bnbf.quantize_4bit(t, blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant)
    return {"": packed, **state.as_dict(packed=True)}


def write_nf4(sd: dict, path, double_quant: bool = False, prefix: str = "model.diffusion_model.",
              blocksize: int = 64, use_bitsandbytes: bool = False) -> pathlib.Path:
    """NF4 of every 2-D weight, saved as bitsandbytes' ``Linear4bit`` saves it (Forge's file layout): quantised by
    ``nf4_reference`` (bitsandbytes' bytes, plain or double-quantised) or by bitsandbytes itself
    (``use_bitsandbytes``, where it is installed)."""
    import torch
    from safetensors.torch import save_file
    out = {}
    for key, t in sd.items():
        if t.dim() == 2 and key.endswith(".weight"):
            t = t.to(torch.bfloat16)
            parts = (_bnb_state_dict(t, blocksize, double_quant) if use_bitsandbytes
                     else nf4_reference(t, blocksize, double_quant))
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
