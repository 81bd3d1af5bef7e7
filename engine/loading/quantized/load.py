"""A FLUX.1 transformer from a GGUF / bitsandbytes 4-bit / fp8 file, its weights kept quantized.

The architecture is inferred from the logical shapes exactly as for a bf16 file (``transformer``), the BFL keys are
converted by the same ``convert_bfl_transformer`` (quantized matrices are cut by rows, byte-exact), and every
``nn.Linear`` whose weight is quantized in the file becomes a layer that dequantises on the fly
(``layers.quantized_linear``). Everything else (biases, norms, a matrix the file keeps in F32/F16) is cast to the
compute dtype as in ``load.assemble``. A quantized tensor that is not a Linear weight is dequantised at load.
"""
from __future__ import annotations

import torch

from ..errors import ModelFileError, check_fits, few
from ..transformer import build_transformer, convert_bfl_transformer, infer_transformer_config
from .layers import quantized_linear
from .read import describe, logical_meta, read_tensors
from .tensors import QTensor


def _strip_side(sd: dict) -> dict:
    from ..detect import split_side_keys
    main, _side = split_side_keys(sd)
    return {k: sd[k] for k in main}


def load_quantized_transformer(group, kind: str, fmt: str, dtype, device) -> torch.nn.Module:
    """``FluxTransformer2DModel`` from a quantized file (``kind`` from ``read.file_kind``; ``fmt`` "bfl" or
    "diffusers" from detection) on ``device``, quantized layers dequantising to the input's dtype."""
    device = torch.device(device)
    meta = _strip_side(logical_meta(describe(group, kind)))
    cfg = infer_transformer_config(meta)
    tensors = _strip_side(read_tensors(group, kind))
    tensors = convert_bfl_transformer(tensors) if fmt == "bfl" else tensors
    return assemble_quantized(lambda: build_transformer(cfg), tensors, dtype, device)


def _module_and_name(model, key):
    mod_path, _, name = key.rpartition(".")
    return (model.get_submodule(mod_path) if mod_path else model), mod_path, name


def assemble_quantized(build, tensors: dict, dtype, device) -> torch.nn.Module:
    """``load.assemble`` for a state dict holding quantized matrices: check names and logical shapes one to one,
    swap the quantized Linears, assign the rest (cast per tensor), eval, no grad."""
    with torch.device("meta"):
        model = build()
    want = model.state_dict(keep_vars=True)
    check_fits(tensors, want)

    def cast(t):
        return t.to(device=device, dtype=dtype if (dtype is not None and t.is_floating_point()) else t.dtype)

    rest, swapped = {}, set()
    for key, t in tensors.items():
        if not isinstance(t, QTensor):
            continue
        layer, path, name = _module_and_name(model, key)
        if name == "weight" and isinstance(layer, torch.nn.Linear) and t.dim() == 2:
            bias = tensors.get(f"{path}.bias")
            new = quantized_linear(t, None if bias is None else cast(bias)).to(device)
            parent, _p, child = _module_and_name(model, path)
            setattr(parent, child, new)
            swapped.add(f"{path}.bias")
        else:  # a quantized tensor in a place that is not a Linear weight: dequantised once, here
            rest[key] = t.dequantize(torch.float32)
    rest.update({k: v for k, v in tensors.items() if not isinstance(v, QTensor) and k not in swapped})
    model.load_state_dict({k: cast(v) for k, v in rest.items()}, strict=False, assign=True)
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left and device.type != "meta":
        raise ModelFileError(f"{len(left)} parameter(s) were not loaded ({few(left)}).")
    model.eval()
    model.requires_grad_(False)
    return model



def load_quantized_flux2_transformer(group, kind: str, fmt: str, dtype, device) -> torch.nn.Module:
    """``Flux2Transformer2DModel`` from a quantized file: FLUX.2's own conversion and inference
    (``engine.flux2.loading``), the same quantized layers."""
    from ...flux2 import loading as f2
    meta = logical_meta(describe(group, kind))
    meta = f2.convert_bfl_transformer(meta) if fmt == "bfl" else meta
    cfg = f2.infer_transformer_config(meta, group.config() if fmt == "diffusers" else None)
    tensors = read_tensors(group, kind)
    tensors = f2.convert_bfl_transformer(tensors) if fmt == "bfl" else tensors
    return assemble_quantized(lambda: f2.build_transformer(cfg), tensors, dtype, torch.device(device))
