"""A tiny random-weight InstantX IP-Adapter + SigLIP in their official file layouts, for the offline demo and the tests.

``write_ipadapter_demo(models_dir)`` writes, under ``<models_dir>/FLUX-Studio/FLUX.1-dev-IP-Adapter-random-demo/``
(``engine.registry.adapter_demo_id("FLUX.1-dev-IP-Adapter")``):

    model.safetensors   a whole SiglipModel as google/siglip-so400m-patch14-384 ships it: ``text_model.*``,
                        ``vision_model.*`` (with the MAP head ``vision_model.head.*``), ``logit_scale``, ``logit_bias``
                        (F32, as the real file)
    ip-adapter.bin      ``torch.save`` of the nested dict {"image_proj": {proj.0, proj.2, norm}, "ip_adapter":
                        {"<i>.to_k_ip.weight", "<i>.to_v_ip.weight"}} (BF16), one block per block of the FLUX.1 demo's
                        transformer (2 double + 2 single), 128 tokens as wide as its T5

The vision tower keeps the real input (384x384 in patches of 14) at a small width with SigLIP's head width of 72.
The safetensors file carries its stamp in its header; the pickle cannot, so a stamp file beside it says which writer
and seed made it (``files.write_pickle_once``). Each is written once.
"""
from __future__ import annotations

import pathlib

from . import flux1
from .files import demo_stamp, write_pickle_once, write_safetensors_once
from .siglip import SIGLIP as BASE_SIGLIP
from .siglip import siglip_layers, siglip_vision
from .weights import RandomWeights

VERSION = 1
MODEL_ID = "FLUX-Studio/FLUX.1-dev-IP-Adapter-random-demo"
SIGLIP_FILE = "model.safetensors"
ADAPTER_FILE = "ip-adapter.bin"

SIGLIP = dict(BASE_SIGLIP, text_vocab=256, text_positions=64)   # the real file also holds the text tower (32000, 64)
NUM_TOKENS = 128             # 128, as the real image projection


def demo_folder(models_dir) -> pathlib.Path:
    return pathlib.Path(models_dir) / MODEL_ID


def siglip_state_dict(seed: int = 0) -> dict:
    """A whole SiglipModel's tensors under the real file's names, F32."""
    import torch

    c = SIGLIP
    h = c["hidden_size"]
    w = RandomWeights(seed, "ipadapter-siglip", torch.float32)
    t = "text_model."
    w.normal(t + "embeddings.token_embedding.weight", (c["text_vocab"], h), 0.5)
    w.normal(t + "embeddings.position_embedding.weight", (c["text_positions"], h), 0.5)
    siglip_layers(w, t, c)
    w.norm(t + "final_layer_norm.weight", h, t + "final_layer_norm.bias")
    w.linear(t + "head", h, h)
    siglip_vision(w, c)
    w.normal("logit_scale", (1,), 0.1, mean=2.3)
    w.normal("logit_bias", (1,), 0.1, mean=-10.0)
    return w.sd


def adapter_state_dict(seed: int = 0) -> dict:
    """The nested dict of ip-adapter.bin, BF16, for the FLUX.1 demo's transformer."""
    import torch

    t = flux1.TRANSFORMER
    cross, inner = t["context_in_dim"], t["hidden_size"]
    blocks = t["depth"] + t["depth_single_blocks"]
    siglip = SIGLIP["hidden_size"]
    w = RandomWeights(seed, "ipadapter", torch.bfloat16)
    w.linear("proj.0", 2 * siglip, siglip)
    w.linear("proj.2", cross * NUM_TOKENS, 2 * siglip)
    w.norm("norm.weight", cross, "norm.bias")
    image_proj = dict(w.sd)
    w.sd = {}
    for i in range(blocks):
        w.linear(f"{i}.to_k_ip", inner, cross, bias=False)
        w.linear(f"{i}.to_v_ip", inner, cross, bias=False, gain=4.0)   # a visible pull in the demo
    return {"image_proj": image_proj, "ip_adapter": dict(w.sd)}


def write_ipadapter_demo(models_dir, seed: int = 0) -> pathlib.Path:
    """Write (once) the two demo files; returns the demo's folder (``<models_dir>/<MODEL_ID>``)."""
    folder = demo_folder(models_dir)
    readme = (f"# {MODEL_ID}\n\nRandom weights: reference images read with these files steer the image at random. "
              f"The files have the layouts of google/siglip-so400m-patch14-384's {SIGLIP_FILE} (a whole SiglipModel) "
              f"and InstantX/FLUX.1-dev-IP-Adapter's {ADAPTER_FILE} (a nested torch pickle) at tiny widths; they run "
              f"with {flux1.DEMO_MODEL_ID}. Written by FLUX Studio (engine/demo/ipadapter.py).\n")
    write_safetensors_once(folder / SIGLIP_FILE, lambda: siglip_state_dict(seed),
                           demo_stamp("ipadapter-siglip", VERSION, seed))
    write_pickle_once(folder / ADAPTER_FILE, lambda: adapter_state_dict(seed), demo_stamp("ipadapter", VERSION, seed),
                      readme)
    if not (folder / "README.md").exists():
        (folder / "README.md").write_text(readme)
    return folder


__all__ = ["ADAPTER_FILE", "MODEL_ID", "NUM_TOKENS", "SIGLIP", "SIGLIP_FILE", "adapter_state_dict", "demo_folder",
           "siglip_state_dict", "write_ipadapter_demo"]
