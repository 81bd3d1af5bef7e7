"""Seeded random tensors for the demo state dicts: each component draws from its own stream, in a fixed order.

Scales are chosen so activations keep unit size through the tiny stacks (outputs depend visibly on inputs) and
norm scales sit near, not at, 1 (a swapped or dropped norm shows up in parity tests).
"""
from __future__ import annotations

import math
import zlib


def generator(seed: int, name: str):
    """A CPU generator for component ``name``: one stream per component, so changing one component never changes
    the others' weights."""
    import torch

    return torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63))


class RandomWeights:
    """Draws tensors in a fixed order from a seeded generator (float32), cast to the file's dtype, into ``sd``."""

    def __init__(self, seed, name, dtype):
        import torch

        self.torch = torch
        self.g = generator(seed, name)
        self.dtype = dtype
        self.sd = {}

    def normal(self, key, shape, std, mean=0.0):
        t = self.torch.randn(shape, generator=self.g, dtype=self.torch.float32) * std + mean
        self.sd[key] = t.to(self.dtype)

    def linear(self, prefix, out_f, in_f, bias=True, gain=1.0):
        # ~N(0, 1/fan_in): activations keep unit scale through the stack.
        self.normal(prefix + ".weight", (out_f, in_f), gain / math.sqrt(in_f))
        if bias:
            self.normal(prefix + ".bias", (out_f,), 0.05)

    def conv(self, prefix, out_c, in_c, k, gain=1.0):
        self.normal(prefix + ".weight", (out_c, in_c, k, k), gain / math.sqrt(in_c * k * k))
        self.normal(prefix + ".bias", (out_c,), 0.05)

    def norm(self, key_weight, n, key_bias=None):
        # Scales near 1 (not exactly 1) so a swapped or dropped norm shows up in parity tests.
        self.normal(key_weight, (n,), 0.1, mean=1.0)
        if key_bias:
            self.normal(key_bias, (n,), 0.05)
