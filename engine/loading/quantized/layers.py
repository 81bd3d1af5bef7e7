"""Linear layers whose weight stays quantized in memory and is dequantised on the fly, one layer at a time.

- GGUF: diffusers' ``GGUFLinear`` with its ``GGUFParameter`` (so diffusers' CUDA kernels run where they are
  installed); on the native path the weight is dequantised by diffusers' torch port of ggml in float32 and cast to
  the input's dtype (diffusers' own native path keeps the block scales in float16, a rounding we avoid).
- bitsandbytes 4-bit and fp8: ``PackedLinear``. On CUDA with bitsandbytes the 4-bit weight is dequantised by
  ``bitsandbytes.functional.dequantize_4bit``; elsewhere by the same published algorithm in torch.

Every stored tensor of a quantized weight is an integer tensor (fp8 bytes as uint8, float32 scales as int32 bit
patterns): ``Module.to(dtype)``, layer-wise casting and the planner's size rule then leave them as they are (the
planner counts a non-floating parameter at its real bytes), and ``quant_shape`` gives the logical shape.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .tensors import QFP8, QGGUF, QNF4, QTensor, fp8_dequantize, gguf_dequantize, nf4_dequantize


def _frozen(t: torch.Tensor, quant_shape=None) -> torch.nn.Parameter:
    p = torch.nn.Parameter(t, requires_grad=False)
    if quant_shape is not None:
        p.quant_shape = torch.Size(quant_shape)
    return p


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32).contiguous().view(torch.int32)


def _float(bits: torch.Tensor) -> torch.Tensor:
    return bits.view(torch.float32)


def _make_gguf_linear():
    from diffusers.quantizers.gguf.utils import GGUFLinear

    class FluxGGUFLinear(GGUFLinear):
        """GGUFLinear computing in the input's dtype, dequantised in float32 on the native path."""

        def forward_native(self, inputs):
            w = gguf_dequantize(self.weight.as_tensor(), self.weight.quant_type, self.weight.quant_shape)
            bias = None if self.bias is None else self.bias.to(inputs.dtype)
            return F.linear(inputs, w.to(inputs.dtype), bias)

        def forward_cuda(self, inputs):
            self.compute_dtype = inputs.dtype
            return super().forward_cuda(inputs).to(inputs.dtype)

    return FluxGGUFLinear


_GGUF_LINEAR = None


def gguf_linear(q: QGGUF, bias) -> torch.nn.Module:
    global _GGUF_LINEAR
    from diffusers.quantizers.gguf.utils import GGUFParameter
    if _GGUF_LINEAR is None:
        _GGUF_LINEAR = _make_gguf_linear()
    out_f, in_f = q.shape
    with torch.device("meta"):
        layer = _GGUF_LINEAR(in_f, out_f, bias=bias is not None, compute_dtype=None)
    layer.weight = GGUFParameter(q.data.contiguous() if not q.data.is_contiguous() else q.data, quant_type=q.qtype)
    if bias is not None:
        layer.bias = _frozen(bias)
    return layer


class PackedLinear(torch.nn.Linear):
    """y = x W^T + b with W kept packed (bitsandbytes 4-bit or fp8) and dequantised at each call. An ``nn.Linear``
    (in/out features, forward hooks) so that runtime LoRAs and offloading treat it as one; its ``weight`` holds the
    packed bytes."""

    def __init__(self, q: QTensor, bias):
        torch.nn.Module.__init__(self)   # not Linear.__init__: it would allocate a float weight
        self.out_features, self.in_features = int(q.shape[0]), int(q.shape[1])
        self.format = q.kind
        if isinstance(q, QNF4):
            self.weight = _frozen(q.packed.reshape(-1).view(torch.uint8), q.shape)
            self.absmax = _frozen(_bits(q.absmax))
            self.code = _frozen(_bits(q.code))
            self.blocksize, self.quant_type, self.fp8_dtype = q.blocksize, q.quant_type, None
            self.orig_dtype = q.dtype   # bitsandbytes dequantises to the dtype the weights were quantised from
            self.scale = None
        elif isinstance(q, QFP8):
            self.weight = _frozen(q.data.contiguous().view(torch.uint8), q.shape)
            self.scale = None if q.scale is None else _frozen(_bits(q.scale.reshape(-1)))
            self.fp8_dtype, self.quant_type = q.data.dtype, None
        else:
            raise TypeError(f"PackedLinear takes 4-bit or fp8 matrices, not {type(q).__name__}")
        self.bias = None if bias is None else _frozen(bias)

    def dequantized(self, dtype=torch.float32) -> torch.Tensor:
        shape = (self.out_features, self.in_features)
        if self.fp8_dtype is not None:
            scale = None if self.scale is None else _float(self.scale)
            return fp8_dequantize(self.weight.view(self.fp8_dtype).reshape(shape), scale).to(dtype)
        absmax, code = _float(self.absmax), _float(self.code)
        if self.weight.is_cuda:
            w = _bnb_dequantize(self.weight, absmax, code, self.blocksize, self.quant_type, shape, self.orig_dtype)
            if w is not None:
                return w.to(dtype)
        return nf4_dequantize(self.weight, absmax, code, self.blocksize, shape).to(self.orig_dtype).to(dtype)

    def forward(self, x):
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized(torch.float32).to(x.dtype), bias)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}"


def _bnb_dequantize(packed, absmax, code, blocksize, quant_type, shape, dtype):
    """bitsandbytes' own kernel for the same algorithm, where it is installed (None: use the torch one)."""
    try:
        import bitsandbytes.functional as bnbf
    except Exception:  # noqa: BLE001 - optional: the torch path computes the same values
        return None
    state = bnbf.QuantState(absmax=absmax, shape=torch.Size(shape), code=code, blocksize=blocksize,
                            quant_type=quant_type, dtype=dtype)
    return bnbf.dequantize_4bit(packed.reshape(-1, 1), quant_state=state)


def quantized_linear(q: QTensor, bias) -> torch.nn.Module:
    if isinstance(q, QGGUF):
        return gguf_linear(q, bias)
    return PackedLinear(q, bias)


def dequantize_module_weight(layer) -> torch.Tensor:
    """The float32 weight a quantized layer computes with (for tests and export)."""
    if isinstance(layer, PackedLinear):
        return layer.dequantized(torch.float32)
    w = layer.weight
    if hasattr(w, "quant_type"):
        return gguf_dequantize(w.as_tensor(), w.quant_type, w.quant_shape)
    return w.detach().to(torch.float32)
