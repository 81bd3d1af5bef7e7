"""A tiny random-weight DiffSynth-Studio LoRA Encoder in the official key layout, for the offline demo and the tests.

``write_lora_encoder_demo(models_dir)`` writes ``<models_dir>/FLUX-Studio/LoRA-Encoder-FLUX.1-Dev-random-demo/
model.safetensors`` (BF16, as the real file): one query per linear layer of the FLUX.1 demo's transformer (its 2
double + 2 single blocks: 26 layers, 4 tokens each instead of 16), one projection per layer type, one encoder layer,
tokens as wide as the demo's T5 (``flux1.T5["d_model"]``), so it runs with that demo and LoRAs made for it.
"""
from __future__ import annotations

import pathlib

from . import flux1
from .files import demo_stamp, write_safetensors_once
from .weights import RandomWeights

VERSION = 1
MODEL_ID = "FLUX-Studio/LoRA-Encoder-FLUX.1-Dev-random-demo"   # engine.registry.adapter_demo_id(...)
FILE = "model.safetensors"
TOKENS_PER_LAYER = 4     # 16
INTERMEDIATE = 64        # 8192


def layer_widths() -> dict:
    """{DiffSynth layer name: (in, out)} of the demo transformer's linear layers."""
    t = flux1.TRANSFORMER
    h, d, s = t["hidden_size"], t["depth"], t["depth_single_blocks"]
    mlp = int(h * t["mlp_ratio"])
    double = {"attn.a_to_qkv": (h, 3 * h), "attn.a_to_out": (h, h), "ff_a.0": (h, mlp), "ff_a.2": (mlp, h),
              "norm1_a.linear": (h, 6 * h)}
    double.update({k.replace("a_to", "b_to").replace("_a.", "_b."): v for k, v in list(double.items())})
    single = {"to_qkv_mlp": (h, 3 * h + mlp), "proj_out": (h + mlp, h), "norm.linear": (h, 3 * h)}
    out = {f"blocks.{i}.{k}": v for i in range(d) for k, v in double.items()}
    out.update({f"single_blocks.{i}.{k}": v for i in range(s) for k, v in single.items()})
    return out


def encoder_state_dict(seed: int = 0) -> dict:
    import torch

    width = flux1.T5["d_model"]
    w = RandomWeights(seed, "lora-encoder", torch.bfloat16)
    kinds = {}
    for name, (din, dout) in layer_widths().items():
        key = "embedder.model_dict." + name.replace(".", "___")
        w.normal(key + ".x", (1, TOKENS_PER_LAYER, din), 1.0)
        w.norm(key + ".layer_norm.weight", dout, key + ".layer_norm.bias")
        kinds.setdefault(name.split(".", 2)[2].replace(".", "___"), dout)
    for kind, dout in kinds.items():
        w.linear(f"embedder.proj_dict.{kind}", width, dout)
    for p in ("to_q", "to_k", "to_v", "to_out"):
        w.linear(f"encoders.0.attn.{p}", width, width)
    w.norm("encoders.0.layer_norm1.weight", width, "encoders.0.layer_norm1.bias")
    w.norm("encoders.0.layer_norm2.weight", width, "encoders.0.layer_norm2.bias")
    w.linear("encoders.0.fc1", INTERMEDIATE, width)
    w.linear("encoders.0.fc2", width, INTERMEDIATE)
    w.normal("special_embeds", (1, 1, width), 1.0)
    w.norm("final_layer_norm.weight", width, "final_layer_norm.bias")
    w.linear("final_linear", width, width)
    return w.sd


def write_lora_encoder_demo(models_dir, seed: int = 0) -> pathlib.Path:
    """Write (once) the demo encoder; returns its folder (``<models_dir>/<MODEL_ID>``)."""
    folder = pathlib.Path(models_dir) / MODEL_ID
    readme = (f"# {MODEL_ID}\n\nRandom weights: a LoRA encoded with this file is a random token. The file has the "
              f"key layout of DiffSynth-Studio/LoRA-Encoder-FLUX.1-Dev's {FILE} for {flux1.DEMO_MODEL_ID}'s "
              f"{len(layer_widths())} layers. Written by FLUX Studio (engine/demo/lora_encoder.py).\n")
    write_safetensors_once(folder / FILE, lambda: encoder_state_dict(seed), demo_stamp("lora-encoder", VERSION, seed),
                           readme=readme)
    return folder


__all__ = ["MODEL_ID", "FILE", "encoder_state_dict", "layer_widths", "write_lora_encoder_demo"]
