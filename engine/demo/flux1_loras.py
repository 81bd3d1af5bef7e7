"""Random FLUX.1 LoRAs for the demo transformer that cover EVERY linear layer (2 double + 2 single blocks, 26
layers), in DiffSynth-Studio's key layout (``<FluxDiT layer>.lora_A.default.weight`` / ``lora_B``).

The LoRA Encoder reads all of a LoRA's layers, so only a LoRA that covers them all can be encoded as a prompt
token; these make the Generate tab's "Encode as prompt" and "Merge with LoRA Fusion" options tryable in the offline
demo. ``write_flux1_demo_loras(folder)`` writes ``<folder>/<name>.safetensors`` for each of ``NAMES``.
"""
from __future__ import annotations

import pathlib

from .files import demo_stamp, write_safetensors_once
from .lora_encoder import layer_widths
from .weights import RandomWeights

VERSION = 1
NAMES = ("ink-random-demo", "glow-random-demo")
RANK = 4


def lora_state_dict(seed: int) -> dict:
    import torch

    w = RandomWeights(seed, "flux1-demo-lora", torch.bfloat16)
    for layer, (din, dout) in layer_widths().items():
        w.normal(f"{layer}.lora_A.default.weight", (RANK, din), din ** -0.5)
        w.normal(f"{layer}.lora_B.default.weight", (dout, RANK), 0.3)
    return w.sd


def write_flux1_demo_loras(folder, seed: int = 0) -> dict:
    """Write (once) the demo LoRAs into ``folder``; {name: path}."""
    folder = pathlib.Path(folder)
    out = {}
    for i, name in enumerate(NAMES):
        path = folder / f"{name}.safetensors"
        write_safetensors_once(path, lambda i=i: lora_state_dict(seed + i),
                               demo_stamp("flux1-demo-lora", VERSION, seed + i))
        out[name] = path
    return out


__all__ = ["NAMES", "lora_state_dict", "write_flux1_demo_loras"]
