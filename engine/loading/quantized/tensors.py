"""Quantized weight matrices as read from a file, before they become layers: GGUF blocks, bitsandbytes NF4, fp8.

Each ``Q*`` object knows its logical shape (rows = output features, as in ``nn.Linear.weight``), its real bytes,
how to take a range of rows (the BFL -> diffusers conversion splits fused q|k|v and q|k|v|mlp matrices by rows and
swaps the final modulation's halves) and how to dequantise. Row ranges are exact byte slices, never a
dequantise-requantise round trip: GGUF blocks run along a row, NF4 blocks along the row-major flattened matrix (a
cut must fall on a block edge, which FLUX's widths always do), fp8 is one byte per value.

``torch.cat``/``chunk``/``split`` work on them (``__torch_function__``) so ``transformer.convert_bfl_transformer``
converts a quantized state dict with the code that converts the bf16 one.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..errors import ModelFileError


class QTensor:
    """Common part: logical shape, row ranges, chunk/split/cat."""

    kind = "?"
    shape: torch.Size

    def rows(self, a: int, b: int) -> "QTensor":
        raise NotImplementedError

    @classmethod
    def cat_rows(cls, parts: list) -> "QTensor":
        raise NotImplementedError

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        raise NotImplementedError

    def dim(self) -> int:
        return len(self.shape)

    def is_floating_point(self) -> bool:  # so that a loader's cast leaves it alone
        return False

    def split(self, sizes, dim=0) -> list:
        if dim != 0:
            raise ModelFileError(f"a quantized {self.kind} matrix can only be split by rows (dim 0), not dim {dim}.")
        n = self.shape[0]
        sizes = [sizes] * (n // sizes) if isinstance(sizes, int) else list(sizes)
        out, a = [], 0
        for s in sizes:
            out.append(self.rows(a, a + s))
            a += s
        return out

    def chunk(self, n, dim=0) -> list:
        if self.shape[0] % n:
            raise ModelFileError(f"a quantized matrix of {self.shape[0]} rows cannot be cut in {n} equal parts.")
        return self.split(self.shape[0] // n, dim)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.cat:
            parts, dim = args[0], kwargs.get("dim", args[1] if len(args) > 1 else 0)
            if dim != 0 or len({type(p) for p in parts}) != 1:
                raise ModelFileError("quantized matrices can only be joined by rows, and only with their own kind.")
            return type(parts[0]).cat_rows(list(parts))
        raise ModelFileError(f"{func.__name__} is not defined on a quantized matrix (only row ranges are).")

    def __repr__(self):
        return f"{type(self).__name__}({self.kind}, shape={list(self.shape)}, {self.nbytes} bytes)"


# ------------------------------------------------------------------------------------------------------------ GGUF
@dataclass(eq=False)
class QGGUF(QTensor):
    """A GGUF tensor of a block type: ``data`` uint8 [rows, bytes per row] (each row whole blocks)."""

    data: torch.Tensor
    qtype: int                       # gguf.GGMLQuantizationType value
    shape: torch.Size = None

    @property
    def kind(self):
        import gguf
        return gguf.GGMLQuantizationType(self.qtype).name

    @property
    def nbytes(self):
        return self.data.numel()

    def rows(self, a, b):
        return replace(self, data=self.data[a:b], shape=torch.Size((b - a, *self.shape[1:])))

    @classmethod
    def cat_rows(cls, parts):
        if len({p.qtype for p in parts}) != 1:
            raise ModelFileError("GGUF matrices of different block types cannot be joined.")
        return replace(parts[0], data=torch.cat([p.data for p in parts]),
                       shape=torch.Size((sum(p.shape[0] for p in parts), *parts[0].shape[1:])))

    def dequantize(self, dtype=torch.float32):
        return gguf_dequantize(self.data, self.qtype, self.shape).to(dtype)


def gguf_dequantize(data: torch.Tensor, qtype: int, shape) -> torch.Tensor:
    """diffusers' torch port of ggml's dequantisation, in float32 (diffusers' own call leaves the block scales in
    float16, which rounds products such as Q8_0's d*q)."""
    from diffusers.quantizers.gguf.utils import GGML_QUANT_SIZES, dequantize_functions

    block, type_size = GGML_QUANT_SIZES[qtype]
    blocks = data.reshape(-1).view(torch.uint8).reshape(-1, type_size)
    return dequantize_functions[qtype](blocks, block, type_size, dtype=torch.float32).reshape(tuple(shape))


# ------------------------------------------------------------------------------------------------------------- NF4
@dataclass(eq=False)
class QNF4(QTensor):
    """bitsandbytes 4-bit: ``packed`` uint8, two codes per byte (first element in the high nibble), row-major;
    ``absmax`` float32 per block of ``blocksize`` elements (double-quantised absmax is expanded at read time);
    ``code`` the 16-value table (``quant_map``: NF4's normal-float levels, or FP4's)."""

    packed: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    blocksize: int
    shape: torch.Size
    quant_type: str = "nf4"
    dtype: torch.dtype = torch.float32   # the weights' dtype before quantisation: bitsandbytes dequantises to it

    @property
    def kind(self):
        return self.quant_type.upper()

    @property
    def nbytes(self):
        return self.packed.numel() + self.absmax.numel() * 4 + self.code.numel() * 4

    def rows(self, a, b):
        cols = int(torch.Size(self.shape[1:]).numel())
        lo, hi = a * cols, b * cols
        if lo % self.blocksize or hi % self.blocksize:
            raise ModelFileError(f"rows {a}..{b} of a {list(self.shape)} {self.kind} matrix do not start and end on "
                                 f"its {self.blocksize}-value blocks: it cannot be split without requantising.")
        return replace(self, packed=self.packed.reshape(-1)[lo // 2:hi // 2],
                       absmax=self.absmax[lo // self.blocksize:hi // self.blocksize],
                       shape=torch.Size((b - a, *self.shape[1:])))

    @classmethod
    def cat_rows(cls, parts):
        if len({(p.blocksize, p.quant_type) for p in parts}) != 1 or any(
                not torch.equal(p.code, parts[0].code) for p in parts):
            raise ModelFileError("4-bit matrices with different block sizes or code tables cannot be joined.")
        for p in parts[:-1]:
            if p.shape.numel() % p.blocksize:
                raise ModelFileError("a 4-bit matrix that ends inside a block cannot be joined to another.")
        return replace(parts[0], packed=torch.cat([p.packed.reshape(-1) for p in parts]),
                       absmax=torch.cat([p.absmax for p in parts]),
                       shape=torch.Size((sum(p.shape[0] for p in parts), *parts[0].shape[1:])))

    def dequantize(self, dtype=torch.float32):
        return nf4_dequantize(self.packed, self.absmax, self.code, self.blocksize, self.shape).to(self.dtype).to(dtype)


def nf4_dequantize(packed, absmax, code, blocksize, shape) -> torch.Tensor:
    """bitsandbytes' published 4-bit algorithm: value = code[nibble] * absmax[its block], high nibble first."""
    flat = packed.reshape(-1).view(torch.uint8)
    idx = torch.stack([flat >> 4, flat & 0x0F], dim=1).reshape(-1).long()
    n = int(torch.Size(shape).numel())
    values = code.to(torch.float32)[idx[:n]]
    scale = absmax.to(torch.float32).repeat_interleave(blocksize)[:n]
    return (values * scale).reshape(tuple(shape))


# ------------------------------------------------------------------------------------------------------------- fp8
@dataclass(eq=False)
class QFP8(QTensor):
    """An fp8 matrix (e4m3fn or e5m2) with an optional scale: one value for the tensor (ComfyUI's ``scale_weight``
    / ``weight_scale``) or one per row; value = fp8 * scale."""

    data: torch.Tensor
    scale: torch.Tensor | None = None
    shape: torch.Size = None

    def __post_init__(self):
        if self.shape is None:
            self.shape = self.data.shape

    @property
    def kind(self):
        name = str(self.data.dtype).replace("torch.", "")
        return f"{name} scaled" if self.scale is not None else name

    @property
    def nbytes(self):
        return self.data.numel() + (0 if self.scale is None else self.scale.numel() * 4)

    def _row_scale(self):
        return None if self.scale is None or self.scale.numel() == 1 else self.scale.reshape(-1)

    def rows(self, a, b):
        rs = self._row_scale()
        return replace(self, data=self.data[a:b], scale=self.scale if rs is None else rs[a:b],
                       shape=torch.Size((b - a, *self.shape[1:])))

    @classmethod
    def cat_rows(cls, parts):
        if len({p.data.dtype for p in parts}) != 1 or len({p.scale is None for p in parts}) != 1:
            raise ModelFileError("fp8 matrices of different types cannot be joined.")
        scale = parts[0].scale
        if scale is not None and not all(p.scale.numel() == 1 and torch.equal(p.scale, scale) for p in parts):
            scale = torch.cat([p.scale.reshape(-1).expand(p.shape[0]) for p in parts])  # per row from here on
        return replace(parts[0], data=torch.cat([p.data for p in parts]), scale=scale,
                       shape=torch.Size((sum(p.shape[0] for p in parts), *parts[0].shape[1:])))

    def dequantize(self, dtype=torch.float32):
        return fp8_dequantize(self.data, self.scale).to(dtype)


def fp8_dequantize(data, scale) -> torch.Tensor:
    w = data.to(torch.float32)
    if scale is None:
        return w
    s = scale.to(torch.float32)
    return w * (s.reshape(()) if s.numel() == 1 else s.reshape(-1, *([1] * (w.dim() - 1))))
