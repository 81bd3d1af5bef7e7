"""A tiny random-weight ByteDance InfiniteYou in its official file layouts, for the offline demo and the tests.

``write_infiniteyou_demo(models_dir)`` writes, under ``<models_dir>/FLUX-Studio/InfiniteYou-random-demo/``:

    infu_flux_v1.0/aes_stage2/image_proj_model.bin        torch.save of {"image_proj": {...}} (BF16), the real
                                                          file's nesting and key names
    infu_flux_v1.0/aes_stage2/InfuseNetModel/diffusion_pytorch_model.safetensors
                                                          a FLUX ControlNet in diffusers' layout, 4 double + 10
                                                          single blocks as the real InfuseNet (BF16)

The projector keeps the real input (512-d embedding) and 8 queries at 128 wide (two heads of 64, the head width the
loader assumes), 2 layers, and writes tokens as wide as the FLUX.1 demo's T5 (``flux1.T5["d_model"]``); InfuseNet
has the FLUX.1 demo transformer's widths, so both run with that demo. The projector is written once (a stamp file
beside it names version and seed); InfuseNet by ``files.write_safetensors_once``.
"""
from __future__ import annotations

import pathlib

from . import flux1
from .controlnet import controlnet_blocks
from .files import demo_stamp, write_pickle_once, write_safetensors_once
from .weights import RandomWeights

VERSION = 1
MODEL_ID = "FLUX-Studio/InfiniteYou-random-demo"          # engine.registry.adapter_demo_id("InfiniteYou")
PROJECTOR_FILE = "infu_flux_v1.0/aes_stage2/image_proj_model.bin"
INFUSENET_FILE = "infu_flux_v1.0/aes_stage2/InfuseNetModel/diffusion_pytorch_model.safetensors"

PROJECTOR = dict(dim=128, depth=2, heads=2, num_queries=8, embedding_dim=512, ff_mult=4)  # real 1280, 4, 20, 8, 512, 4
INFUSENET_BLOCKS = (4, 10)                                                              # as the real one


def demo_folder(models_dir) -> pathlib.Path:
    return pathlib.Path(models_dir) / MODEL_ID


def projector_state_dict(seed: int = 0) -> dict:
    """The projector's tensors under the file's inner names (``latents``, ``proj_in``, ``layers.*``, ...), BF16."""
    import torch

    c = PROJECTOR
    d, inner, out, ff = c["dim"], c["heads"] * 64, flux1.T5["d_model"], c["dim"] * c["ff_mult"]
    w = RandomWeights(seed, "infiniteyou-projector", torch.bfloat16)
    w.normal("latents", (1, c["num_queries"], d), d ** -0.5)
    w.linear("proj_in", d, c["embedding_dim"], gain=8.0)      # a unit-length embedding: widen its features
    for i in range(c["depth"]):
        p = f"layers.{i}."
        w.norm(p + "0.norm1.weight", d, p + "0.norm1.bias")
        w.norm(p + "0.norm2.weight", d, p + "0.norm2.bias")
        w.linear(p + "0.to_q", inner, d, bias=False)
        w.linear(p + "0.to_kv", 2 * inner, d, bias=False)
        w.linear(p + "0.to_out", d, inner, bias=False)
        w.norm(p + "1.0.weight", d, p + "1.0.bias")
        w.linear(p + "1.1", ff, d, bias=False)
        w.linear(p + "1.3", d, ff, bias=False)
    w.linear("proj_out", out, d)
    w.norm("norm_out.weight", out, "norm_out.bias")
    return w.sd


def infusenet_state_dict(seed: int = 0) -> dict:
    """InfuseNet's tensors (diffusers ``FluxControlNetModel`` names), at the demo transformer's widths, BF16."""
    import torch

    c = flux1.TRANSFORMER
    h, hd, mlp = c["hidden_size"], c["head_dim"], int(c["hidden_size"] * c["mlp_ratio"])
    it = RandomWeights(seed, "infiniteyou-infusenet", torch.bfloat16)
    for emb, width in (("timestep_embedder", c["time_embed_dim"]), ("guidance_embedder", c["time_embed_dim"]),
                       ("text_embedder", c["vec_in_dim"])):
        it.linear(f"time_text_embed.{emb}.linear_1", h, width)
        it.linear(f"time_text_embed.{emb}.linear_2", h, h)
    it.linear("context_embedder", h, flux1.T5["d_model"])
    it.linear("x_embedder", h, c["in_channels"])
    it.linear("controlnet_x_embedder", h, c["in_channels"])
    controlnet_blocks(it, h, hd, mlp, *INFUSENET_BLOCKS)
    return it.sd


def write_infiniteyou_demo(models_dir, seed: int = 0) -> pathlib.Path:
    """Write (once) the two demo files; returns the demo's folder (``<models_dir>/<MODEL_ID>``)."""
    folder = demo_folder(models_dir)
    readme = (f"# {MODEL_ID}\n\nRandom weights: identities made with these files are noise. The files have the key "
              f"layout of ByteDance/InfiniteYou's {PROJECTOR_FILE} (a torch pickle of {{'image_proj': ...}}) and "
              f"InfuseNetModel/ (a FLUX ControlNet of 4 + 10 blocks) at tiny widths; they run with "
              f"{flux1.DEMO_MODEL_ID}. Written by FLUX Studio (engine/demo/infiniteyou.py).\n")
    write_pickle_once(folder / PROJECTOR_FILE, lambda: {"image_proj": projector_state_dict(seed)},
                      demo_stamp("infiniteyou-projector", VERSION, seed))
    write_safetensors_once(folder / INFUSENET_FILE, lambda: infusenet_state_dict(seed),
                           demo_stamp("infiniteyou-infusenet", VERSION, seed))
    if not (folder / "README.md").exists():
        (folder / "README.md").write_text(readme)
    return folder


__all__ = ["MODEL_ID", "PROJECTOR_FILE", "INFUSENET_FILE", "PROJECTOR", "demo_folder", "projector_state_dict",
           "infusenet_state_dict", "write_infiniteyou_demo"]
